"""Sample one token per row: temperature, Gumbel-max with counter-hash noise, the chosen
token's logprob and the row's soundness, in one pass over the logits.

    x        = logits.float() / temperature                       [N, V]
    noise    = Gumbel(0, 1) from hash(seed, index, step, token)   [N, V]  (gumbel_noise_ref)
    token    = argmax(x + noise)    (greedy rows: argmax(x))      [N]     first maximum on ties
    logprob  = x[token] - logsumexp(x)                            [N]
    finite   = no NaN, no +inf, some finite logit in the row      [N]

argmax(x + Gumbel noise) is an exact sample of softmax(x). The noise is a pure function of
(seed, completion index, step, token id), so a request's tokens depend on its seed and its
own logits only (runtime/sampler.py). A row that is not `finite` gets a meaningless token
(the engine fails it); the reference zeroes such a row first, the kernel does not.

Shapes: logits [N, V] fp32/fp16/bf16, last dim contiguous; temperature [N] fp32 (1 for greedy
rows and for logits already divided); greedy [N] bool; seed [N] int64 in [0, 2**63); index,
step [N] int64. Outputs: token [N] int64, logprob [N] fp32, finite [N] bool.

The kernel: (row, chunk of V) programs each keep the chunk's best score, the x at it, and an
online (max, sum of exp) of x; a second kernel reduces a row's chunks. The torch sampler
spent ~124 launches (80 of them the [N, V] int64 hash) on this: 3.4 ms of a batch-1 sampled
step on the H100, 4.8 ms at batch 64 (scratch/sampled_prof.py, 2026-12-06).
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from trtllm.kernels.registry import interpreter_upcast, register_op, triton_interpreter_on

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_TILE = 2048          # logits a program reads per step of its loop
_TILES_PER_CHUNK = 2  # a program's chunk: 4,096 logits (Llama-3's 128,256: 32 programs a row)


# -- reference -------------------------------------------------------------------------------
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on int64 tensors holding 32-bit values. Both multipliers
    are < 2**31, so products stay < 2**63: no overflow, no uint64 needed."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _combine(h: torch.Tensor, v) -> torch.Tensor:
    return _mix32(((h ^ v) + _GOLDEN) & _M32)


def open_unit(x: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64) -> fp32 uniforms strictly inside (0, 1), from their top 23 bits:
    m + 0.5 is exact in fp32 below 2**23. (With 24 bits, m = 2**24 - 1 rounded to u = 1.0,
    Gumbel noise +inf: that token won whatever its logit and beat a grammar's or top-k's
    -inf mask (-inf + inf = NaN, which argmax takes) — one draw in 2**24, a row of 128k
    tokens every ~128 sampled steps.)"""
    return ((x >> 9).to(torch.float32) + 0.5) * 2.0 ** -23


def gumbel_noise_ref(seed: torch.Tensor, index: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] Gumbel(0, 1) noise, a pure function of (seed, index, step, token id)."""
    k = _combine(seed & _M32, seed >> 32)      # seed < 2**63: shift is exact
    k1 = _combine(_combine(k, index & _M32), step & _M32)
    k2 = _combine(k1, 0x2545F491)
    tok = torch.arange(vocab_size, device=k.device)
    # two keyed rounds, so one step's noise is no simple permutation of another's
    x = _combine(_combine(k1[:, None], tok[None, :]), k2[:, None])
    return -torch.log(-torch.log(open_unit(x)))


def finite_rows_ref(logits: torch.Tensor) -> torch.Tensor:
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)
    return ~bad & torch.isfinite(logits).any(-1)


def sample_rows_ref(logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, seed: torch.Tensor,
                    index: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    finite = finite_rows_ref(logits)
    x = torch.where(finite[:, None], logits.float(), 0.0) / temperature[:, None]
    token = x.argmax(-1)
    if not bool(greedy.all()):
        token = torch.where(greedy, token, (x + gumbel_noise_ref(seed, index, step, x.shape[-1])).argmax(-1))
    logprob = x.gather(-1, token[:, None])[:, 0] - x.logsumexp(-1)
    return token, logprob, finite


# -- kernel ----------------------------------------------------------------------------------
@triton.jit
def _mix32_u32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD  # uint32: wraps mod 2**32, as the reference's & _M32
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _combine_u32(h, v):
    return _mix32_u32((h ^ v) + 0x9E3779B9)


@triton.jit
def _sample_chunk_kernel(
    logits_ptr, temperature_ptr, greedy_ptr, seed_ptr, index_ptr, step_ptr, part_f_ptr, part_i_ptr,
    V, row_stride,
    TILE: tl.constexpr, TILES: tl.constexpr, NUM_CHUNKS: tl.constexpr, EXACT_LOG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    t = tl.load(temperature_ptr + row)
    is_greedy = tl.load(greedy_ptr + row).to(tl.int1)
    seed = tl.load(seed_ptr + row)
    k = _combine_u32((seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32))
    k = _combine_u32(k, (tl.load(index_ptr + row) & 0xFFFFFFFF).to(tl.uint32))
    k1 = _combine_u32(k, (tl.load(step_ptr + row) & 0xFFFFFFFF).to(tl.uint32))
    k2 = _combine_u32(k1, 0x2545F491)
    best_s = -float("inf")
    best_x = 0.0
    best_i = 0
    m = -float("inf")
    s = 0.0
    bad = 0     # a NaN or +inf seen
    some = 0    # a finite logit seen
    for i in tl.static_range(TILES):
        offs = chunk * (TILE * TILES) + i * TILE + tl.arange(0, TILE)
        mask = offs < V
        raw = tl.load(logits_ptr + row * row_stride + offs, mask=mask, other=-float("inf")).to(tl.float32)
        bad = bad | tl.max(((raw != raw) | (raw == float("inf"))).to(tl.int32), axis=0)
        some = some | tl.max(((raw > -float("inf")) & (raw < float("inf"))).to(tl.int32), axis=0)
        x = raw / t
        u = ((_combine_u32(_combine_u32(k1, offs.to(tl.uint32)), k2) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        if EXACT_LOG:  # libdevice's logf, as torch.log on CUDA: the same noise bits as the reference
            noise = -libdevice.log(-libdevice.log(u))
        else:  # the interpreter has no libdevice
            noise = -tl.log(-tl.log(u))
        score = tl.where(mask, tl.where(is_greedy, x, x + noise), -float("inf"))
        tile_best = tl.max(score, axis=0)
        tile_i = tl.argmax(score, axis=0, tie_break_left=True)
        tile_x = tl.sum(tl.where(tl.arange(0, TILE) == tile_i, x, 0.0), axis=0)
        take = tile_best > best_s  # an earlier tile keeps a tie
        best_x = tl.where(take, tile_x, best_x)
        best_i = tl.where(take, i * TILE + tile_i, best_i)
        best_s = tl.where(take, tile_best, best_s)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        grow = tl.sum(tl.where(mask, tl.exp(x - m_new), 0.0), axis=0)
        s = tl.where(m_new == -float("inf"), 0.0, s * tl.exp(m - m_new) + grow)
        m = m_new
    part = row * NUM_CHUNKS + chunk
    tl.store(part_f_ptr + part * 4 + 0, best_s)
    tl.store(part_f_ptr + part * 4 + 1, best_x)
    tl.store(part_f_ptr + part * 4 + 2, m)
    tl.store(part_f_ptr + part * 4 + 3, s)
    tl.store(part_i_ptr + part * 2 + 0, chunk * (TILE * TILES) + best_i)
    tl.store(part_i_ptr + part * 2 + 1, bad * 2 + some)


@triton.jit
def _sample_reduce_kernel(
    part_f_ptr, part_i_ptr, token_ptr, logprob_ptr, finite_ptr,
    NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < NUM_CHUNKS
    base = row * NUM_CHUNKS + c
    best_s = tl.load(part_f_ptr + base * 4 + 0, mask=mask, other=-float("inf"))
    best_x = tl.load(part_f_ptr + base * 4 + 1, mask=mask, other=0.0)
    m = tl.load(part_f_ptr + base * 4 + 2, mask=mask, other=-float("inf"))
    s = tl.load(part_f_ptr + base * 4 + 3, mask=mask, other=0.0)
    idx = tl.load(part_i_ptr + base * 2 + 0, mask=mask, other=0)
    flags = tl.load(part_i_ptr + base * 2 + 1, mask=mask, other=0)
    w = tl.argmax(best_s, axis=0, tie_break_left=True)  # chunks are in token order: the first maximum
    token = tl.sum(tl.where(c == w, idx, 0), axis=0)
    x_tok = tl.sum(tl.where(c == w, best_x, 0.0), axis=0)
    m_all = tl.max(m, axis=0)
    s_all = tl.sum(tl.where(m == -float("inf"), 0.0, s * tl.exp(m - m_all)), axis=0)
    bad = tl.max(flags >> 1, axis=0)
    some = tl.max(flags & 1, axis=0)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, x_tok - (m_all + tl.log(s_all)))
    tl.store(finite_ptr + row, ((bad == 0) & (some == 1)).to(tl.int8))


def sample_rows_triton(logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, seed: torch.Tensor,
                       index: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assert logits.dim() == 2 and logits.stride(-1) == 1, f"logits {tuple(logits.shape)}: [N, V], last dim contiguous"
    assert logits.dtype in (torch.float32, torch.float16, torch.bfloat16), logits.dtype
    n, v = logits.shape
    for name, t, dtype in (("temperature", temperature, torch.float32), ("greedy", greedy, torch.bool),
                           ("seed", seed, torch.int64), ("index", index, torch.int64), ("step", step, torch.int64)):
        assert t.shape == (n,) and t.dtype == dtype and t.device == logits.device, \
            f"{name}: {tuple(t.shape)} {t.dtype} on {t.device}, want ({n},) {dtype}"
    token = torch.empty(n, dtype=torch.int64, device=logits.device)
    logprob = torch.empty(n, dtype=torch.float32, device=logits.device)
    finite = torch.empty(n, dtype=torch.bool, device=logits.device)
    if n == 0:
        return token, logprob, finite
    chunks = triton.cdiv(v, _TILE * _TILES_PER_CHUNK)
    part_f = torch.empty(n, chunks, 4, dtype=torch.float32, device=logits.device)
    part_i = torch.empty(n, chunks, 2, dtype=torch.int64, device=logits.device)
    with interpreter_upcast((logits,)) as ((logits,), ()):
        _sample_chunk_kernel[(n, chunks)](
            logits, temperature.contiguous(), greedy.contiguous(), seed.contiguous(), index.contiguous(),
            step.contiguous(), part_f, part_i, v, logits.stride(0),
            TILE=_TILE, TILES=_TILES_PER_CHUNK, NUM_CHUNKS=chunks,
            EXACT_LOG=not triton_interpreter_on(), num_warps=8)
    _sample_reduce_kernel[(n,)](part_f, part_i, token, logprob, finite.view(torch.int8),
                                NUM_CHUNKS=chunks, BLOCK=triton.next_power_of_2(chunks), num_warps=1)
    return token, logprob, finite


def _sample_rows_fake(logits, temperature, greedy, seed, index, step):
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=torch.int64), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.bool))


sample_rows = register_op("sample_rows", launcher=sample_rows_triton, reference=sample_rows_ref,
                          fake=_sample_rows_fake)
