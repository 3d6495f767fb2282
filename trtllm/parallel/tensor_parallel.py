"""One rank of a tensor-parallel group, as `trtllm.compile(model, tensor_parallel=...)` takes it,
and the size rules every layer of the group follows.

    tp = TensorParallel(rank=1, size=2, group_name=group.group_name)
    local = tp.weight_slice("model.layers.0.self_attn.q_proj.weight", param, dim=0, start=64, length=64)

Heads split evenly across ranks (`heads % size == 0`). KV heads split evenly when they can;
when there are fewer KV heads than ranks (`size % kv_heads == 0`) each rank holds the one KV
head its query heads use, replicated across `size // kv_heads` ranks. Anything else is
refused, naming the numbers, before any process starts (`check_sizes`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trtllm.config import QuantAlgo
from trtllm.parallel.expert_parallel import ExpertParallel

# (parameter name, full tensor or placeholder, dim, start, length) -> the slice, materialized
SliceReader = Callable[[str, torch.Tensor, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group. `read_slice` reads a weight's slice
    from the checkpoint (a rank that loaded only its slices, parallel/checkpoint_slices.py);
    None narrows the module's own full weight (a model already in memory)."""
    rank: int
    size: int
    group_name: str  # the process group's name, as torch.ops._c10d_functional takes it
    read_slice: SliceReader | None = None
    # rank 0 of a group the library started: its `Workers` (parallel/workers.py), which
    # CompiledModel hands every call to (`send_step`) and asks to explain a failed one (`failure`)
    workers: Any = None
    # how the MoE layers split (parallel/expert_parallel.py); None: TP inside every expert (moe_tp = size)
    moe: ExpertParallel | None = None
    # (the fused expert weight, "w13" | "w2", first expert, count, first intermediate feature, count)
    # -> this rank's experts, read from the checkpoint (parallel/expert_checkpoint.py); None: narrowed
    # from the whole weight in memory
    read_experts: Callable[..., torch.Tensor] | None = None
    # QuantConfig's online FP8 algorithm (a QuantAlgo): the split linears' slices are quantized as
    # one rank quantizes the whole weight (quantization/fp8_slices.py); None: the model's dtype
    quant_algo: QuantAlgo | None = None
    # (parameter name, full tensor or placeholder) -> the whole weight, for scales that cover
    # other ranks' elements; None: the module's own full weight (a model already in memory)
    read_whole: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    # what the pass made, by key: a recompiled graph (new shapes) reuses the slices, not a new copy
    _made: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside 0..{self.size - 1}")

    def weight_slice(self, name: str, full: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
        """`full.narrow(dim, start, length)` as a contiguous tensor of its own, made once."""
        return self.made(("slice", name, dim, start, length), lambda: self.read(name, full, dim, start, length))

    def read(self, name: str, full: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
        """`weight_slice`, read anew (for a caller that keeps what it makes of it: `made`)."""
        if self.read_slice is not None:
            return self.read_slice(name, full, dim, start, length)
        return full.detach().narrow(dim, start, length).contiguous().clone()

    def experts(self, full: torch.Tensor, which: str, first: int, count: int, start: int, length: int) -> torch.Tensor:
        """This rank's experts [count, 2*length, H] (which="w13": gate rows then up rows, each
        [start, start+length) of I) or [count, H, length] (which="w2") of a fused expert weight
        [E, 2I, H] / [E, H, I], made once."""
        return self.made(("experts", id(full), which, first, count, start, length),
                         lambda: self.read_expert_slice(full, which, first, count, start, length))

    def read_expert_slice(self, full: torch.Tensor, which: str, first: int, count: int, start: int,
                          length: int) -> torch.Tensor:
        """`experts`, read anew (for a caller that keeps what it makes of it: `made`)."""
        if self.read_experts is not None:
            return self.read_experts(full, which, first, count, start, length)
        w = full.detach()[first:first + count]
        if which == "w13":
            inter = w.shape[1] // 2
            return torch.cat([w[:, start:start + length], w[:, inter + start:inter + start + length]], 1).clone()
        return w[:, :, start:start + length].contiguous().clone()

    def made(self, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`make()` the first time `key` is asked for, the same tensor after."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


def local_kv_heads(kv_heads: int, size: int) -> int:
    """KV heads each rank holds: split evenly, or one replicated head when fewer than ranks."""
    if kv_heads % size == 0:
        return kv_heads // size
    if size % kv_heads == 0:
        return 1
    raise ValueError(f"num_key_value_heads={kv_heads} neither divides among tensor_parallel_size={size} "
                     f"nor divides it (KV heads are replicated only when their count divides the ranks)")


def head_range(heads: int, size: int, rank: int, kv: bool) -> tuple[int, int]:
    """(first head, number of heads) of `rank` for a projection of `heads` heads (kv: KV heads,
    which may be replicated)."""
    if heads % size == 0:
        per = heads // size
        return rank * per, per
    if kv:
        local_kv_heads(heads, size)  # raises with the numbers unless size % heads == 0
        return rank * heads // size, 1
    raise ValueError(f"num_attention_heads={heads} does not divide among tensor_parallel_size={size}")


def check_sizes(size: int, *, num_attention_heads: int, num_key_value_heads: int,
                intermediate_size: int | None = None) -> None:
    """Refuse a tensor-parallel size the model's heads or MLP width cannot split by, with the numbers."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if size == 1:
        return
    head_range(num_attention_heads, size, 0, kv=False)
    local_kv_heads(num_key_value_heads, size)
    if intermediate_size is not None and intermediate_size % size:
        raise ValueError(f"intermediate_size={intermediate_size} does not divide among tensor_parallel_size={size}")


# -- weights a rank did not load --------------------------------------------------------
_UNLOADED: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def unloaded(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A stand-in of `shape` for a weight this rank did not load (it loads only its slice,
    which the pass reads): no memory, every element one shared zero, so the model can be
    built, probed and traced with its whole shapes."""
    device = torch.device(device)
    key = (dtype, device)
    if key not in _UNLOADED:
        _UNLOADED[key] = torch.zeros((), dtype=dtype, device=device)
    return _UNLOADED[key].expand(tuple(shape))


# shared zero slabs of stand-ins for fused expert weights, per (dtype, device); a larger one
# is added when an expert needs more (the older ones stay: stand-ins made of them hold them)
_EXPERT_SLABS: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}


def unloaded_experts(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A stand-in of a fused expert weight [E, A, B] this rank did not load: one expert's [A, B]
    of zeros (a slab shared by every such stand-in) repeated E times with stride 0. Unlike
    `unloaded`'s all-zero strides, each expert is an ordinary row-major matrix, as HF's default
    grouped_mm experts require in the eager probe (passes/shard_experts.py reads the rank's own
    experts later)."""
    device = torch.device(device)
    slabs = _EXPERT_SLABS.setdefault((dtype, device), [])
    need = 1
    for s in shape[1:]:
        need *= s
    if not slabs or slabs[-1].numel() < need:
        slabs.append(torch.zeros(need, dtype=dtype, device=device))
    return slabs[-1][:need].view(tuple(shape[1:])).expand(tuple(shape))


def is_unloaded(t: torch.Tensor) -> bool:
    if t.dim() == 0:
        return False
    ptr = t.untyped_storage().data_ptr()
    zero = _UNLOADED.get((t.dtype, t.device))
    if zero is not None and all(s == 0 for s in t.stride()) and ptr == zero.untyped_storage().data_ptr():
        return True
    return t.stride(0) == 0 and any(ptr == slab.untyped_storage().data_ptr()
                                    for slab in _EXPERT_SLABS.get((t.dtype, t.device), ()))
