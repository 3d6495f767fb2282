"""Thread-block clusters from Triton: the launch, and the PTX a kernel needs inside one.

Hopper runs a cluster's programs (CTAs) at once on one GPC, and they can read each
other's shared memory (`mapa` / `ld.shared::cluster`). Triton 3.6's `tl` has no way to ask
for that: `num_ctas > 1` also splits every tensor of the program across the cluster. So
the kernel is compiled as usual (num_ctas = 1: each program's layouts are its own) and
its launcher is called with the cluster size in the launch metadata, which the launcher
turns into gridDim.x = grid[0] and a (cluster, 1, 1) cluster shape: program_id(0) //
cluster names a program's cluster, program_id(0) % cluster its rank in it.

`extra_smem` bytes are added past the kernel's own shared memory: the kernel's scratch,
addressed from the end of its dynamic allocation (`scratch_addr`). Inside the kernel:
`cluster_arrive` / `cluster_wait` (the cluster barrier), `store_to_rank0` (a write into
cluster program 0's shared memory), `shared_load` (a read of the program's own). The kernel's
arguments are bound once by `warmup` (compiling on first use, as a launch would) and
passed on in the order of its parameters, constexprs included, as Triton's own launch
does.
"""
import ctypes
import functools

import torch
import triton
import triton.language as tl

_SMEM_WITHOUT_OPT_IN = 48 * 1024  # bytes a launch gets without the function attribute below
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


@functools.cache
def cluster_launchable(device: torch.device) -> bool:
    """Thread-block clusters need compute capability 9.0 (Hopper) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def _allow_dynamic_smem(function: int, nbytes: int) -> None:
    """Let `function` launch with nbytes of dynamic shared memory (Triton opts a kernel in
    at load time only when its own shared memory passes 48 KB)."""
    rc = ctypes.CDLL("libcuda.so.1").cuFuncSetAttribute(
        ctypes.c_void_p(function), _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, ctypes.c_int(nbytes))
    if rc != 0:
        raise RuntimeError(f"cuFuncSetAttribute(max dynamic shared memory = {nbytes} B) failed: CUresult {rc}")


def launch_cluster(kernel, grid, cluster: int, extra_smem: int, args: dict, *, num_warps: int,
                   num_stages: int) -> None:
    """Launch kernel[grid](**args) in clusters of `cluster` programs along grid[0], with
    `extra_smem` more bytes of shared memory than the compiled kernel uses."""
    assert grid[0] % cluster == 0 and 1 < cluster <= 8, (grid, cluster)
    compiled = kernel.warmup(**args, grid=grid, num_warps=num_warps, num_stages=num_stages)
    if hasattr(compiled, "result"):  # an async compile's future
        compiled = compiled.result()
    run = compiled.run  # loads the module on first use
    smem = compiled.metadata.shared + extra_smem
    if smem > _SMEM_WITHOUT_OPT_IN:
        _allow_dynamic_smem(compiled.function, smem)
    stream = torch.cuda.current_stream().cuda_stream
    run(grid[0] // cluster, grid[1], grid[2], stream, compiled.function,
        (compiled.metadata.num_warps, cluster, smem), None, None, None,
        *(args[name] for name in kernel.arg_names))


@triton.jit
def scratch_addr(offset, SCRATCH: tl.constexpr):
    """Shared-window address of byte `offset` of this program's scratch: the last SCRATCH
    bytes of its dynamic shared memory (the `extra_smem` of `launch_cluster`)."""
    end = tl.inline_asm_elementwise(
        "{ .reg .b32 n; mov.u32 $0, global_smem; mov.u32 n, %dynamic_smem_size; add.u32 $0, $0, n; }",
        "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    return end - SCRATCH + offset


@triton.jit
def store_to_rank0(addr, x, ok):
    """x (fp32) into cluster program 0's shared memory at addr (an address of this
    program's window, mapped over), where ok."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 r; setp.ne.b32 p, $3, 0; mapa.shared::cluster.u32 r, $1, 0;\n\t"
        "@p st.shared::cluster.b32 [r], $2; mov.u32 $0, 0; }",
        "=r,r,r,r", [addr, x.to(tl.int32, bitcast=True), ok.to(tl.int32)], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def shared_load(addr):
    """fp32 at addr of this program's shared memory (after the barrier that published it)."""
    x = tl.inline_asm_elementwise("ld.shared.b32 $0, [$1];", "=r,r", [addr], dtype=tl.int32,
                                  is_pure=False, pack=1)
    return x.to(tl.float32, bitcast=True)


@triton.jit
def cluster_arrive(RELEASE: tl.constexpr):
    """This thread arrives at the cluster barrier. RELEASE: its earlier memory operations
    are made visible to the cluster first, which waits for all of its pending stores to be
    acknowledged (pending global stores: ~1 us under decode attention's K/V stream)."""
    if RELEASE:
        tl.inline_asm_elementwise("barrier.cluster.arrive.release;\n\tmov.u32 $0, 0;", "=r", [],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("barrier.cluster.arrive.relaxed;\n\tmov.u32 $0, 0;", "=r", [],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def cluster_wait():
    """Wait (acquire) until every thread of the cluster has arrived at the barrier's phase."""
    tl.inline_asm_elementwise("barrier.cluster.wait.acquire;\n\tmov.u32 $0, 0;", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)
