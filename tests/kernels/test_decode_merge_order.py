"""kernels/paged_attention/decode_merge.py's ticket merge: the output does not depend on which
split finished last and merges (on the GPU that changes from run to run). Interpreted: a
kernel folds random stored partials as each split in turn would, the same bits every time."""
import torch
import triton
import triton.language as tl

from trtllm.kernels.paged_attention.decode_merge import fold_in_split_order

G, D, SPLITS = 4, 32, 5


@triton.jit
def _fold_as(pm_ptr, pl_ptr, pacc_ptr, out_m, out_l, out_acc, split,
             G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
    offs_g = tl.arange(0, G)
    offs_d = tl.arange(0, D)
    base = offs_g * SPLITS  # row g's partials at g * SPLITS + split
    m_own = tl.load(pm_ptr + base + split)
    l_own = tl.load(pl_ptr + base + split)
    acc_own = tl.load(pacc_ptr + (base + split)[:, None] * D + offs_d[None, :])
    m_i, l_i, acc = fold_in_split_order(m_own, l_own, acc_own, split, pm_ptr, pl_ptr, pacc_ptr, base, offs_g < G,
                                        offs_d < D, offs_d, D, G, D, SPLITS)
    tl.store(out_m + offs_g, m_i)
    tl.store(out_l + offs_g, l_i)
    tl.store(out_acc + offs_g[:, None] * D + offs_d[None, :], acc)


def test_the_merge_is_the_same_bits_whichever_split_merges():
    m = torch.randn(G * SPLITS) * 4
    m[3] = float("-inf")  # an empty split (a trailing split past the sequence's end)
    sums = torch.rand(G * SPLITS) * 10 + 0.1
    sums[3] = 0.0
    acc = torch.randn(G * SPLITS, D) * 3
    acc[3] = 0.0
    results = []
    for split in range(SPLITS):
        outs = torch.empty(G), torch.empty(G), torch.empty(G, D)
        _fold_as[(1,)](m, sums, acc, *outs, split, G=G, D=D, SPLITS=SPLITS)
        results.append(outs)
    for outs in results[1:]:
        for got, want in zip(outs, results[0]):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    # and it is the softmax merge: sum over splits of 2^(m - max) * l (and * acc)
    mm = m.view(G, SPLITS)
    top = mm.max(1).values
    w = torch.exp2(mm - top[:, None])
    torch.testing.assert_close(results[0][1], (w * sums.view(G, SPLITS)).sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(results[0][2], (w[..., None] * acc.view(G, SPLITS, D)).sum(1), rtol=1e-5, atol=1e-5)
