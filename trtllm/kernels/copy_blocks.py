"""A paged KV pool's copy-on-write block copies, every layer, each word read once and written once.

    copy_blocks(pool, src, dst, tokens):
        pool[l, dst[i], :tokens[i]] = pool[l, src[i], :tokens[i]]    every layer l, every pair i

Shapes: pool [L, NB, block_size, ...] contiguous, any dtype (a block's row of one layer is moved
as int64 words when its bytes are a multiple of 8, else as bytes: FP8 and INT8 caches too); src,
dst, tokens [P] int64 on the pool's device, 0 <= tokens[i] <= block_size. A block's first tokens
are a prefix of its row, so a pair moves the words that hold them (rounded up to a whole word:
what lies past them in the copy is never read before a step writes it). Each dst is a
block no pair reads (runtime/block_manager.py takes a fresh one for every copy), so the pairs are
independent.

Why: beam search forks a beam onto its parent's blocks, and the beam's next write into the
shared partial block copies it first (~25 blocks of 4 MB a step at Llama-3.1-8B shapes, 16
requests x 4 beams). The torch form, `index_select` into a temporary then `index_copy_`, moves
every byte twice: read and write into the temporary, read and write into the pool. Here one
program copies one chunk of one layer's row of one pair: half the traffic, one launch a pool.
And only the tokens the shared block holds are copied (on average half the block: a beam forks
at any position of it).

Grid: (P, L, cdiv(words, BLOCK)).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import register_op

BLOCK = 1024  # words a program: 8 KB of int64


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """pool [L, NB, ...] as [L, NB, words]: int64 where a row's bytes allow, else uint8."""
    rows = pool.view(pool.shape[0], pool.shape[1], -1).view(torch.uint8)
    return rows.view(torch.int64) if rows.shape[-1] % 8 == 0 else rows


def _check(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, tokens: torch.Tensor) -> None:
    assert pool.dim() >= 3 and pool.is_contiguous(), \
        f"pool {tuple(pool.shape)}: expected a contiguous [L, NB, block_size, ...]"
    for name, t in (("src", src), ("dst", dst), ("tokens", tokens)):
        assert t.dtype == torch.int64 and t.dim() == 1 and t.device == pool.device, \
            f"{name}: {t.dtype} {tuple(t.shape)} on {t.device}, expected int64 [P] on {pool.device}"
    assert src.shape == dst.shape == tokens.shape, \
        f"src {tuple(src.shape)}, dst {tuple(dst.shape)}, tokens {tuple(tokens.shape)}: one of each a pair"


def _token_words(pool: torch.Tensor, rows: torch.Tensor) -> tuple[int, int]:
    """(bytes of one token of a block's row, bytes of a word of `rows`)."""
    return math.prod(pool.shape[3:]) * pool.element_size(), rows.element_size()


def copy_blocks_ref(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, tokens: torch.Tensor) -> None:
    """One pair at a time (the pairs are independent); the two-pass torch form of all of it,
    `rows.index_copy_(1, dst, rows.index_select(1, src))`, is what copy_blocks replaced."""
    _check(pool, src, dst, tokens)
    rows = _rows(pool)
    token_bytes, word_bytes = _token_words(pool, rows)
    for s, d, n in zip(src.tolist(), dst.tolist(), tokens.tolist()):
        words = -(-n * token_bytes // word_bytes)
        rows[:, d, :words] = rows[:, s, :words]


@triton.jit
def _copy_blocks_kernel(rows_ptr, src_ptr, dst_ptr, tokens_ptr, layer_stride, block_stride, TOKEN_BYTES, WORD_BYTES,
                        BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    words = (tl.load(tokens_ptr + pair) * TOKEN_BYTES + WORD_BYTES - 1) // WORD_BYTES
    if tl.program_id(2) * BLOCK >= words:  # past the tokens the block holds
        return
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < words
    base = rows_ptr + layer * layer_stride
    row = tl.load(base + tl.load(src_ptr + pair) * block_stride + offs, mask=mask)
    tl.store(base + tl.load(dst_ptr + pair) * block_stride + offs, row, mask=mask)


def copy_blocks_triton(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, tokens: torch.Tensor) -> None:
    _check(pool, src, dst, tokens)
    rows = _rows(pool)
    layers, _, words = rows.shape
    if src.numel() == 0 or layers == 0 or words == 0:
        return
    token_bytes, word_bytes = _token_words(pool, rows)
    _copy_blocks_kernel[(src.numel(), layers, triton.cdiv(words, BLOCK))](
        rows, src, dst, tokens, rows.stride(0), rows.stride(1), token_bytes, word_bytes, BLOCK=BLOCK, num_warps=4)


def _copy_blocks_fake(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, tokens: torch.Tensor) -> None:
    return None


copy_blocks = register_op("copy_blocks", launcher=copy_blocks_triton, reference=copy_blocks_ref,
                          fake=_copy_blocks_fake, mutates_args=("pool",))
