"""Launch a `@triton.jit` kernel as thread-block clusters, with extra dynamic shared memory.

Hopper runs a cluster's programs (CTAs) at once on one GPC, and they can read each
other's shared memory (`mapa` / `ld.shared::cluster`). Triton 3.6's `tl` has no way to ask
for that: `num_ctas > 1` also splits every tensor of the program across the cluster. So
the kernel is compiled as usual (num_ctas = 1: each program's layouts are its own) and
its launcher is called with the cluster size in the launch metadata, which the launcher
turns into gridDim.x = grid[0] and a (cluster, 1, 1) cluster shape. Programs of one
cluster are the ones whose program_id(0) differ only in the lowest log2(cluster) bits.

`extra_smem` bytes are added past the kernel's own shared memory, for the kernel to
address from the end of its dynamic allocation (`%dynamic_smem_size`).
"""
import torch

# The kernel's own shared memory must be past 48 KB: Triton then opts the function into
# the device's full dynamic shared memory at load time, which the extra bytes need.
_OPTED_IN_SMEM = 48 * 1024


def cluster_launchable(device: torch.device) -> bool:
    """Thread-block clusters need compute capability 9.0 (Hopper) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launch_cluster(kernel, grid, cluster: int, extra_smem: int, args: dict, *, num_warps: int,
                   num_stages: int) -> bool:
    """Launch kernel[grid](**args) in clusters of `cluster` programs along grid[0] with
    `extra_smem` more bytes of shared memory. False (nothing launched) if the compiled
    kernel's own shared memory is under the opt-in line (see above); the caller then
    launches another way."""
    assert grid[0] % cluster == 0 and 1 < cluster <= 8, (grid, cluster)
    compiled = kernel.warmup(**args, grid=grid, num_warps=num_warps, num_stages=num_stages)
    if hasattr(compiled, "result"):  # an async compile's future
        compiled = compiled.result()
    if compiled.metadata.shared <= _OPTED_IN_SMEM:
        return False
    run = compiled.run  # loads the module on first use
    stream = torch.cuda.current_stream().cuda_stream
    meta = (compiled.metadata.num_warps, cluster, compiled.metadata.shared + extra_smem)
    run(grid[0] // cluster, grid[1], grid[2], stream, compiled.function, meta, None, None, None,
        *(args[name] for name in kernel.arg_names))
    return True
