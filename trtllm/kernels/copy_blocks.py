"""A paged KV pool's copy-on-write block copies, every layer, each word read once and written once.

    copy_blocks(pool, src, dst):   pool[l, dst[i]] = pool[l, src[i]]    every layer l, every pair i

Shapes: pool [L, NB, ...] contiguous, any dtype (a block's row of one layer is moved as int64
words when its bytes are a multiple of 8, else as bytes: FP8 and INT8 caches too); src, dst [P]
int64 on the pool's device. Each dst is a block no pair reads (runtime/block_manager.py takes a
fresh one for every copy), so the pairs are independent.

Why: beam search forks a beam onto its parent's blocks, and the beam's next write into the
shared partial block copies it first (~25 blocks of 4 MB a step at Llama-3.1-8B shapes, 16
requests x 4 beams). The torch form, `index_select` into a temporary then `index_copy_`, moves
every byte twice: read and write into the temporary, read and write into the pool. Here one
program copies one chunk of one layer's row of one pair: half the traffic, one launch a pool.

Grid: (P, L, cdiv(words, BLOCK)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import register_op

BLOCK = 1024  # words a program: 8 KB of int64


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """pool [L, NB, ...] as [L, NB, words]: int64 where a row's bytes allow, else uint8."""
    rows = pool.view(pool.shape[0], pool.shape[1], -1).view(torch.uint8)
    return rows.view(torch.int64) if rows.shape[-1] % 8 == 0 else rows


def _check(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    assert pool.dim() >= 3 and pool.is_contiguous(), f"pool {tuple(pool.shape)}: expected a contiguous [L, NB, ...]"
    for name, t in (("src", src), ("dst", dst)):
        assert t.dtype == torch.int64 and t.dim() == 1 and t.device == pool.device, \
            f"{name}: {t.dtype} {tuple(t.shape)} on {t.device}, expected int64 [P] on {pool.device}"
    assert src.shape == dst.shape, f"src {tuple(src.shape)} and dst {tuple(dst.shape)}: one pair each"


def copy_blocks_ref(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    _check(pool, src, dst)
    rows = _rows(pool)
    rows.index_copy_(1, dst, rows.index_select(1, src))


@triton.jit
def _copy_blocks_kernel(rows_ptr, src_ptr, dst_ptr, layer_stride, block_stride, WORDS, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WORDS
    base = rows_ptr + layer * layer_stride
    row = tl.load(base + tl.load(src_ptr + pair) * block_stride + offs, mask=mask)
    tl.store(base + tl.load(dst_ptr + pair) * block_stride + offs, row, mask=mask)


def copy_blocks_triton(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    _check(pool, src, dst)
    rows = _rows(pool)
    layers, _, words = rows.shape
    if src.numel() == 0 or layers == 0 or words == 0:
        return
    _copy_blocks_kernel[(src.numel(), layers, triton.cdiv(words, BLOCK))](
        rows, src, dst, rows.stride(0), rows.stride(1), words, BLOCK=BLOCK, num_warps=4)


def _copy_blocks_fake(pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    return None


copy_blocks = register_op("copy_blocks", launcher=copy_blocks_triton, reference=copy_blocks_ref,
                          fake=_copy_blocks_fake, mutates_args=("pool",))
