"""A tensor-parallel rank's FP8 slice of a linear weight: exactly one rank's quantization of the
whole weight (QuantConfig's online FP8, quantization/fp8_linears.py `quantize_weight`), sliced
with the rows of a column-parallel linear or the columns of a row-parallel one.

    q = fp8_slice(algo, shape, dim, start, length, read_part, read_whole)   # an Fp8Linear
    q = rank_fp8_slice(tp, name, stand_in, dim, start, length)               # the same, through a
    # TensorParallel (its reader of slices and of whole weights), made once, with its placeholder
    # and, for a row-parallel slice, the group its activations' amax is all-reduced over

    Wq, s = quantize_weight(W [N, K], algo)          # what one rank holds
    rows (dim 0) [a, a+n):    Wq[a:a+n],    s per tensor: s;  per channel: s[a:a+n];  blocks: s[a/128 .. ]
    columns (dim 1) [a, a+n): Wq[:, a:a+n], s per tensor: s;  per channel: s;         blocks: s[:, a/128 .. ]

Scales that cover only the rank's slice are computed from the slice alone (`read_part`: what
the rank loads anyway): per-channel scales of a column-parallel slice (its own rows), 128x128
block scales of a slice that starts on a block (and ends on one, or at the weight's end). The
others cover elements of other ranks too — a per-tensor scale, a row-parallel slice's
per-channel scales (a row's amax over every column), blocks that straddle the slice's edge —
so the rank reads the whole weight once (`read_whole`), quantizes it as one rank does, keeps
its slice and frees the rest: a transient of one weight, never the model. A slice that starts
inside a 128x128 block and crosses into the next has no block scales of its own that equal one
rank's (its local blocks would each straddle two): refused, naming the numbers.

The activations of a row-parallel linear (its input split by features) are quantized as one
rank quantizes the whole row too (`activation_group`): per token, the amax of the rank's
features is all-reduced (max) over the tensor-parallel group before the division
(passes/quantize_linears.py) — one all-reduce of M floats more per row-parallel linear, which
vLLM and TensorRT-LLM do not pay (their rows quantize per rank: other numbers than one rank's).
With 128x128 blocks, 1x128 activation groups of a slice that starts on a group are one rank's
groups already (no all-reduce); a row of at most 128 features is one group (all-reduced); any
other split of the groups is refused, naming the numbers.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from trtllm.config import QuantAlgo
from trtllm.kernels.fp8_gemm import SCALE_BLOCK
from trtllm.parallel.tensor_parallel import TensorParallel
from trtllm.quantization.fp8_linears import Fp8Linear, placeholder_weight, quantize_expert_weights, quantize_weight


def slice_is_exact(algo: QuantAlgo, shape, dim: int, start: int, length: int) -> bool:
    """Whether quantizing the slice alone gives one rank's scales for it."""
    if algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN:
        return dim == 0
    if algo == QuantAlgo.FP8_BLOCK_SCALES:
        return start % SCALE_BLOCK == 0 and (length % SCALE_BLOCK == 0 or start + length == shape[dim])
    return False  # per tensor: the whole weight's amax


def fp8_slice(algo: QuantAlgo, shape, dim: int, start: int, length: int, read_part: Callable[[], torch.Tensor],
              read_whole: Callable[[], torch.Tensor], name: str = "the weight") -> Fp8Linear:
    """This rank's rows (dim 0) or columns (dim 1) [start, start + length) of `shape`'s weight,
    quantized as one rank quantizes the whole (module docstring)."""
    _check_slice(algo == QuantAlgo.FP8_BLOCK_SCALES, shape, dim, start, length, name)
    if slice_is_exact(algo, shape, dim, start, length):
        return quantize_weight(read_part(), algo)
    return narrow_fp8(quantize_weight(read_whole(), algo), dim, start, length)


def checkpoint_fp8_slice(stored: Fp8Linear, dim: int, start: int, length: int,
                         read_part: Callable[[], torch.Tensor], name: str = "the weight") -> Fp8Linear:
    """This rank's rows (dim 0) or columns (dim 1) [start, start + length) of a pre-quantized
    checkpoint's FP8 linear (`stored`: its scales, its weight a stand-in of the whole shape):
    the FP8 values as stored (`read_part`) with the scales covering them, the static input
    scale whole. Exactly one rank's numbers: nothing is quantized anew."""
    _check_slice(stored.block, tuple(stored.weight.shape), dim, start, length, name)
    part = read_part()
    if part.dtype != stored.weight.dtype or tuple(part.shape) != tuple(stored.weight.narrow(dim, start, length).shape):
        raise ValueError(f"{name}: the slice read is {part.dtype} {tuple(part.shape)}, not the checkpoint's FP8 slice")
    return Fp8Linear(part, narrow_scale(stored, dim, start, length), stored.input_scale)


def _check_slice(block: bool, shape, dim: int, start: int, length: int, name: str) -> None:
    if dim not in (0, 1):
        raise ValueError(f"{name}: an FP8 linear weight is sliced by rows (0) or columns (1), not dim {dim}")
    if block and start % SCALE_BLOCK and start // SCALE_BLOCK != (start + length - 1) // SCALE_BLOCK:
        what = "rows" if dim == 0 else "columns"
        raise ValueError(f"{name}: this rank's {what} [{start}, {start + length}) of {shape[dim]} start inside a "
                         f"{SCALE_BLOCK}x{SCALE_BLOCK} scale block and cross into the next: 128x128 block scales "
                         "under tensor parallelism need each rank's slice to start on a block (or lie within one)")


def narrow_fp8(q: Fp8Linear, dim: int, start: int, length: int) -> Fp8Linear:
    """Rows or columns [start, start + length) of a quantized weight, with the scales covering them."""
    return Fp8Linear(q.weight.narrow(dim, start, length).contiguous(), narrow_scale(q, dim, start, length))


def narrow_scale(q: Fp8Linear, dim: int, start: int, length: int) -> torch.Tensor:
    """The weight scales covering rows or columns [start, start + length) of `q`'s weight."""
    scale = q.weight_scale
    if q.block:
        first = start // SCALE_BLOCK
        count = -(-length // SCALE_BLOCK) if start % SCALE_BLOCK == 0 else 1  # else: within one block
        scale = scale.narrow(dim, first, count)
    elif scale.numel() > 1 and dim == 0:  # per output channel: the slice's rows
        scale = scale.narrow(0, start, length)
    return scale.contiguous().clone()


def activation_group(algo: QuantAlgo, features: int, start: int, length: int, group_name: str,
                     name: str = "the linear") -> str | None:
    """The group over which a row-parallel slice [start, start + length) of `features` input
    features all-reduces its activations' amax (module docstring); None: none needed."""
    if algo != QuantAlgo.FP8_BLOCK_SCALES:
        return group_name  # per token: every feature of the row
    if start % SCALE_BLOCK == 0 and (length % SCALE_BLOCK == 0 or start + length == features):
        return None  # the rank's 1x128 groups are one rank's
    if features <= SCALE_BLOCK:
        return group_name  # one group a row
    raise ValueError(f"{name}: this rank's input features [{start}, {start + length}) of {features} split the "
                     f"1x{SCALE_BLOCK} activation groups of FP8_BLOCK_SCALES; under tensor parallelism each rank's "
                     f"features must start on a group (or the row be one group)")


def rank_fp8_slice(tp: TensorParallel, name: str, full: torch.Tensor, dim: int, start: int, length: int,
                   stored: Fp8Linear | None = None) -> Fp8Linear:
    """`fp8_slice` of `tp.quant_algo` for the weight `name` (its full tensor or stand-in `full`),
    or `checkpoint_fp8_slice` of a pre-quantized checkpoint's linear (`stored`, as
    Fp8Linears.unloaded holds it), read through `tp` and made once; its placeholder (what the
    graph's linear reads, passes/quantize_linears.py finds the FP8 GEMM by it) in `full`'s dtype."""
    def make() -> Fp8Linear:
        def whole() -> torch.Tensor:
            return tp.read_whole(name, full) if tp.read_whole is not None else full.detach()
        if stored is not None:
            if tp.read_slice is None:  # the stand-in's zeros are no weight
                raise ValueError(f"{name}: a pre-quantized weight this rank did not load needs the checkpoint "
                                 "reader (TensorParallel(read_slice=...)) to read its slice")
            q = checkpoint_fp8_slice(stored, dim, start, length,
                                     lambda: tp.read(name, stored.weight, dim, start, length), name)
            # a static input scale quantizes every rank's features alike; dynamic ones as the checkpoint's
            # granularity quantizes them
            algo = None if stored.input_scale is not None else \
                QuantAlgo.FP8_BLOCK_SCALES if stored.block else QuantAlgo.FP8
        else:
            algo = tp.quant_algo
            q = fp8_slice(algo, tuple(full.shape), dim, start, length,
                          lambda: tp.read(name, full, dim, start, length), whole, name)
        q.placeholder = placeholder_weight(q.weight.shape, full.dtype, full.device)
        if dim == 1 and algo is not None:  # a row-parallel slice: its activations are split too
            q.activation_group = activation_group(algo, full.shape[1], start, length, tp.group_name, name)
        return q
    return tp.made(("fp8", name, dim, start, length), make)


def rank_fp8_experts(tp: TensorParallel, full13: torch.Tensor, full2: torch.Tensor, first: int, count: int,
                     start: int, length: int, name: str = "the experts"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W13, its scales, W2, its scales) of this rank's experts [first, first + count) and their
    intermediate features [start, start + length) in FP8 (`tp.quant_algo`), as kernels/
    fused_moe_fp8.py takes them: each expert quantized as one rank quantizes it whole
    (quantize_expert_weights), then its features kept with the scales covering them; made once.
    Features split (TP inside the experts) only with 128x128 blocks on 128-feature boundaries: the
    intermediate activations are quantized per token (or per 1x128 group) inside the fused MoE, and
    a rank's share of a token's features has another amax than the whole row (refused, naming the
    numbers)."""
    algo, inter = tp.quant_algo, full13.shape[1] // 2
    if length != inter and (algo != QuantAlgo.FP8_BLOCK_SCALES or inter % SCALE_BLOCK or start % SCALE_BLOCK
                            or length % SCALE_BLOCK):
        raise ValueError(f"{name}: FP8 experts ({algo.value}) split by intermediate features ([{start}, "
                         f"{start + length}) of {inter} on this rank, moe_tensor_parallel_size > 1) would quantize "
                         f"the intermediate activations per rank: use moe_expert_parallel_size = "
                         f"tensor_parallel_size (whole experts), or FP8_BLOCK_SCALES with each rank's features on "
                         f"{SCALE_BLOCK}-feature boundaries")

    def make():
        q13, s13 = quantize_expert_weights(tp.read_expert_slice(full13, "w13", first, count, 0, inter), algo)
        q2, s2 = quantize_expert_weights(tp.read_expert_slice(full2, "w2", first, count, 0, inter), algo)
        if length == inter:
            return q13, s13, q2, s2
        b0, bn, bi = start // SCALE_BLOCK, length // SCALE_BLOCK, inter // SCALE_BLOCK
        rows = torch.cat([q13[:, start:start + length], q13[:, inter + start:inter + start + length]], 1)
        row_scales = torch.cat([s13[:, b0:b0 + bn], s13[:, bi + b0:bi + b0 + bn]], 1)
        return (rows.contiguous(), row_scales.contiguous(), q2[:, :, start:start + length].contiguous(),
                s2[:, :, b0:b0 + bn].contiguous())
    return tp.made(("fp8 experts", id(full13), id(full2), first, count, start, length), make)
