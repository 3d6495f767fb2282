"""Top-k and top-p (nucleus) filtering by threshold: no sort of the vocabulary.

    t_k   = the k-th largest x in the row                         (k >= V: -inf, keep all)
    p_i   = softmax(x)_i over the tokens with x >= t_k
    t_p   = the largest value t among the row's x with  sum_{x_i >= t} p_i >= top_p
    out   = x where x >= max(t_k, t_p), else -inf                 [N, V]
            (top_p = 1: t_p is not applied)

Ties at a threshold are all kept: k = 2 over (3, 1, 1, 0) keeps 3, 1, 1, and top-p keeps a
token whenever the mass of the tokens strictly above it is < top_p. Equivalently, in sorted
order, top-p keeps the shortest prefix whose mass reaches top_p, widened to the end of the
last value's run of equal logits. (HF's TopKLogitsWarper keeps top-k ties the same way; a
sort keeps some of a run of tied values at the top-p boundary, in an order it does not
specify.)

Shapes: x [N, V] fp32, last dim contiguous, no NaN or +inf (the sampler zeroes such rows
first); top_k [N] int64 (V when off); top_p [N] fp32 in (0, 1] (1 when off). Output [N, V] fp32.

The kernel is a radix select on each value's order-preserving 32-bit key, 4 bits a pass over
(row, 4,096-logit chunk) programs: the count search (top-k) and the mass search (top-p, the
weights exp(x - max)) each take 8 passes; a pass's programs first reduce the previous pass's
per-chunk digit sums to that digit, all alike. A batch-64 fp32 sort of Llama-3's 128,256
logits with its softmax, cumsum and scatter took ~1 ms of an 8B model's sampled step on the
H100 (2026-12-06 profile, docs/decisions/sampled_decode.md).
"""
import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import interpreter_upcast, register_op

_CHUNK = 4096   # logits a program reads in a pass
_TILE = 1024    # ... per step of its loop: a [16, 1024] digit tile
_BINS = 16      # 4 bits a pass, 8 passes for a 32-bit key


# -- reference -------------------------------------------------------------------------------
def top_k_top_p_ref(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    n, v = x.shape
    srt = x.sort(dim=-1, descending=True).values                             # [N, V]
    t_k = srt.gather(1, (top_k.clamp(1, v) - 1)[:, None])                    # [N, 1]
    probs = srt.masked_fill(srt < t_k, float("-inf")).softmax(-1)
    # the first sorted position where the mass reaches top_p; its value's ties come along
    at = (probs.cumsum(-1) < top_p[:, None]).sum(-1, keepdim=True).clamp(max=v - 1)
    t_p = torch.where(top_p[:, None] < 1.0, srt.gather(1, at), float("-inf"))
    return x.masked_fill(x < torch.maximum(t_k, t_p), float("-inf"))


# -- kernel ----------------------------------------------------------------------------------
@triton.jit
def _ukey(x):
    """fp32 -> uint32 in the same order (-0.0 and +0.0 one key)."""
    b = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) == 1, b ^ 0xFFFFFFFF, b | 0x80000000)


@triton.jit
def _digit_weights(part_ptr, row, NUM_CHUNKS: tl.constexpr, C_BLOCK: tl.constexpr):
    """[16]: the row's weight at each value of the last pass's digit (its chunks' sums, reduced
    in the same order by every program that asks)."""
    c = tl.arange(0, C_BLOCK)
    d = tl.arange(0, 16)
    w = tl.load(part_ptr + (row * NUM_CHUNKS + c[:, None]) * 16 + d[None, :], mask=c[:, None] < NUM_CHUNKS,
                other=0.0)
    return tl.sum(w, axis=0)


@triton.jit
def _pick_digit(w, prefix, above, target):
    """The largest digit d with above + (weight at digits >= d) >= target: the key searched for
    continues with d. Returns (prefix * 16 + d, the weight above the new prefix)."""
    d = tl.arange(0, 16)
    at_or_above = tl.sum(tl.where(d[None, :] >= d[:, None], w[None, :], 0.0), axis=1)  # [16]
    digit = tl.maximum(tl.sum(((above + at_or_above) >= target).to(tl.int32), axis=0) - 1, 0)
    return prefix * 16 + digit, above + tl.sum(tl.where(d > digit, w, 0.0), axis=0)


@triton.jit
def _found_key(part_ptr, state_ptr, prefix_ptr, row, NUM_CHUNKS: tl.constexpr, C_BLOCK: tl.constexpr):
    """A finished search's key (int64 holding the uint32), from its last pass's buffers."""
    key, _ = _pick_digit(_digit_weights(part_ptr, row, NUM_CHUNKS, C_BLOCK), tl.load(prefix_ptr + row),
                         tl.load(state_ptr + row * 2 + 0), tl.load(state_ptr + row * 2 + 1))
    return key


@triton.jit
def _row_max(chunk_max_ptr, row, NUM_CHUNKS: tl.constexpr, C_BLOCK: tl.constexpr):
    c = tl.arange(0, C_BLOCK)
    return tl.max(tl.load(chunk_max_ptr + row * NUM_CHUNKS + c, mask=c < NUM_CHUNKS, other=-float("inf")), axis=0)


@triton.jit
def _chunk_max_kernel(x_ptr, chunk_max_ptr, V, row_stride, NUM_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                      TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    m = -float("inf")
    for i in tl.static_range(CHUNK // TILE):
        offs = chunk * CHUNK + i * TILE + tl.arange(0, TILE)
        m = tl.maximum(m, tl.max(tl.load(x_ptr + row * row_stride + offs, mask=offs < V, other=-float("inf")), axis=0))
    tl.store(chunk_max_ptr + row * NUM_CHUNKS + chunk, m)


@triton.jit
def _radix_pass_kernel(
    x_ptr, V, row_stride,
    limit_ptr,                       # [N] top_k (int64) for the count search, top_p (fp32) for the mass one
    prev_part_ptr, prev_state_ptr,   # [N, C, 16] digit weights of the previous pass; [N, 2] its (above, target)
    prev_prefix_ptr,                 # [N] int64: the key's bits resolved before the previous pass
    part_ptr, state_ptr, prefix_ptr,  # this pass's, written (state and prefix by chunk 0)
    chunk_max_ptr,                   # mass: [N, C] chunk maxima (the weights are exp(x - row max))
    floor_part_ptr, floor_state_ptr, floor_prefix_ptr,  # mass after top-k: the count search's last pass
    SHIFT: tl.constexpr,             # this pass's digit: key >> SHIFT & 15 (28, 24, ..., 0)
    MASS: tl.constexpr, HAS_FLOOR: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, C_BLOCK: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    prefix = tl.load(prev_prefix_ptr + row) * 0
    if SHIFT < 28:  # the previous pass's digit; chunk 0 records it for the next pass
        prev_w = _digit_weights(prev_part_ptr, row, NUM_CHUNKS, C_BLOCK)
        if SHIFT == 24:  # the first digit: the target is k, or top_p of the whole weight kept
            above = tl.sum(prev_w, axis=0) * 0.0
            if MASS:
                target = tl.load(limit_ptr + row) * tl.sum(prev_w, axis=0)
            else:
                target = tl.load(limit_ptr + row).to(tl.float32)
        else:
            above = tl.load(prev_state_ptr + row * 2 + 0)
            target = tl.load(prev_state_ptr + row * 2 + 1)
            prefix = tl.load(prev_prefix_ptr + row)
        prefix, above = _pick_digit(prev_w, prefix, above, target)
        if chunk == 0:
            tl.store(state_ptr + row * 2 + 0, above)
            tl.store(state_ptr + row * 2 + 1, target)
            tl.store(prefix_ptr + row, prefix)
    floor = 0
    if HAS_FLOOR:  # top-k's threshold: the mass search weighs only what top-k keeps
        floor = _found_key(floor_part_ptr, floor_state_ptr, floor_prefix_ptr, row, NUM_CHUNKS, C_BLOCK)
    m = 0.0
    if MASS:  # a row of -inf alone weighs nothing (exp(x - 0) = 0), not NaN
        m = _row_max(chunk_max_ptr, row, NUM_CHUNKS, C_BLOCK)
        m = tl.where(m == -float("inf"), 0.0, m)
    d = tl.arange(0, 16)
    w_sum = tl.zeros((16,), tl.float32)
    for i in tl.static_range(CHUNK // TILE):
        offs = chunk * CHUNK + i * TILE + tl.arange(0, TILE)
        inside = offs < V
        x = tl.load(x_ptr + row * row_stride + offs, mask=inside, other=-float("inf"))
        key = _ukey(x)
        if SHIFT < 28:
            inside = inside & ((key >> (SHIFT + 4)) == prefix.to(tl.uint32))
        if HAS_FLOOR:
            inside = inside & (key.to(tl.int64) >= floor)
        # past the first passes most tiles hold no logit of the prefix: they skip the [16, TILE]
        # digit sums, which bound a pass (H100, 256 rows: top-p 1,710 -> 1,141 us, top-k then
        # top-p 3,405 -> 1,854; 512-wide tiles skipped more but gained less)
        if tl.max(inside.to(tl.int32), axis=0) > 0:
            if MASS:
                w = tl.where(inside, tl.exp(x - m), 0.0)
            else:
                w = tl.where(inside, 1.0, 0.0)
            digit = ((key >> SHIFT) & 15).to(tl.int32)
            w_sum += tl.sum(tl.where(digit[None, :] == d[:, None], w[None, :], 0.0), axis=1)
    tl.store(part_ptr + (row * NUM_CHUNKS + chunk) * 16 + d, w_sum)


@triton.jit
def _mask_kernel(
    x_ptr, out_ptr, V, row_stride, out_row_stride, top_k_ptr, top_p_ptr,
    k_part_ptr, k_state_ptr, k_prefix_ptr, p_part_ptr, p_state_ptr, p_prefix_ptr,
    HAS_K: tl.constexpr, HAS_P: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, C_BLOCK: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    t = tl.load(top_k_ptr + row) * 0  # the smallest key: keep all
    if HAS_K:
        t_k = _found_key(k_part_ptr, k_state_ptr, k_prefix_ptr, row, NUM_CHUNKS, C_BLOCK)
        t = tl.where(tl.load(top_k_ptr + row) < V, t_k, t)
    if HAS_P:
        t_p = _found_key(p_part_ptr, p_state_ptr, p_prefix_ptr, row, NUM_CHUNKS, C_BLOCK)
        t = tl.where(tl.load(top_p_ptr + row) < 1.0, tl.maximum(t, t_p), t)
    for i in tl.static_range(CHUNK // TILE):
        offs = chunk * CHUNK + i * TILE + tl.arange(0, TILE)
        inside = offs < V
        x = tl.load(x_ptr + row * row_stride + offs, mask=inside, other=-float("inf"))
        tl.store(out_ptr + row * out_row_stride + offs, tl.where(_ukey(x).to(tl.int64) >= t, x, -float("inf")),
                 mask=inside)


def top_k_top_p_triton(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, *,
                       has_top_k: bool | None = None, has_top_p: bool | None = None) -> torch.Tensor:
    """has_top_k / has_top_p: whether some row has top_k < V / top_p < 1, if the caller knows
    (the sampler does, from the host); else read off the tensors, a device sync (a sampled
    batch-1 step lost 9% to it, H100)."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.dtype == torch.float32, \
        f"x {tuple(x.shape)} {x.dtype}: [N, V] fp32, last dim contiguous"
    n, v = x.shape
    for name, t, dtype in (("top_k", top_k, torch.int64), ("top_p", top_p, torch.float32)):
        assert t.shape == (n,) and t.dtype == dtype and t.device == x.device, \
            f"{name}: {tuple(t.shape)} {t.dtype} on {t.device}, want ({n},) {dtype}"
    out = torch.empty_like(x)
    if n == 0:
        return out
    top_k, top_p = top_k.contiguous(), top_p.contiguous()
    chunks = triton.cdiv(v, _CHUNK)
    grid = (n, chunks)
    meta = dict(NUM_CHUNKS=chunks, C_BLOCK=triton.next_power_of_2(chunks), CHUNK=_CHUNK, TILE=_TILE)
    has_k = bool((top_k < v).any()) if has_top_k is None else has_top_k
    has_p = bool((top_p < 1.0).any()) if has_top_p is None else has_top_p

    def search(limit, mass, floor, chunk_max):
        """8 passes; returns the last pass's (digit weights, state, prefix) for its consumer."""
        part = torch.empty(2, n, chunks, _BINS, dtype=torch.float32, device=x.device)
        state = torch.empty(2, n, 2, dtype=torch.float32, device=x.device)
        prefix = torch.zeros(2, n, dtype=torch.int64, device=x.device)
        for p, shift in enumerate(range(28, -1, -4)):  # ping-pong: pass p reads p - 1's buffers
            cur, prev = p % 2, (p - 1) % 2
            _radix_pass_kernel[grid](
                x, v, x.stride(0), limit, part[prev], state[prev], prefix[prev], part[cur], state[cur], prefix[cur],
                chunk_max, *(floor or (out,) * 3), SHIFT=shift, MASS=mass, HAS_FLOOR=floor is not None, **meta,
                num_warps=8)
        return part[1], state[1], prefix[1]

    with interpreter_upcast((x,)) as ((x,), ()):
        k_found = search(top_k, False, None, out) if has_k else (out,) * 3
        if has_p:
            chunk_max = torch.empty(n, chunks, dtype=torch.float32, device=x.device)
            _chunk_max_kernel[grid](x, chunk_max, v, x.stride(0), NUM_CHUNKS=chunks, CHUNK=_CHUNK, TILE=_TILE,
                                    num_warps=4)
            p_found = search(top_p, True, k_found if has_k else None, chunk_max)
        else:
            p_found = (out,) * 3
        _mask_kernel[grid](x, out, v, x.stride(0), out.stride(0), top_k, top_p, *k_found, *p_found,
                           HAS_K=has_k, HAS_P=has_p, **meta, num_warps=4)
    return out


def _top_k_top_p_fake(x, top_k, top_p):
    return torch.empty_like(x)


top_k_top_p = register_op("top_k_top_p", launcher=top_k_top_p_triton, reference=top_k_top_p_ref,
                          fake=_top_k_top_p_fake)
