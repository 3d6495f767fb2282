import pytest
import torch

from trtllm.kernels.sample_rows import gumbel_noise_ref, sample_rows, sample_rows_ref

# The kernel's logprob sums exp over chunks in another order than torch's logsumexp.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-5, rtol=2e-5),
}


def _operands(n, v, dtype, seed=0, greedy_every=3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    greedy = torch.tensor([i % greedy_every == 0 for i in range(n)], dtype=torch.bool)
    temperature = torch.where(greedy, 1.0, torch.rand(n, generator=g) * 1.5 + 0.2)
    seed_ = torch.randint(0, 2**63 - 1, (n,), generator=g)
    index = torch.randint(0, 8, (n,), generator=g)
    step = torch.randint(0, 5000, (n,), generator=g)
    return logits, temperature, greedy, seed_, index, step


def _scores(logits, temperature, greedy, seed, index, step):
    x = logits.float() / temperature[:, None]
    return torch.where(greedy[:, None], x, x + gumbel_noise_ref(seed, index, step, x.shape[-1]))


def _check(got, want, operands, dtype):
    (tok, lp, fin), (rtok, rlp, rfin) = got, want
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and fin.dtype == torch.bool
    assert torch.equal(fin, rfin)
    # the token: the reference's maximum score (the noise's last ulp may differ on a GPU; a
    # near-tie could then pick the other token, so compare scores, and tokens where no tie)
    score = _scores(*operands)
    rows = torch.arange(len(tok))
    torch.testing.assert_close(score[rows, tok][fin], score[rows, rtok][fin], atol=1e-6, rtol=1e-6)
    assert (tok == rtok)[fin].float().mean() >= 0.95
    torch.testing.assert_close(lp[fin], rlp[fin], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("n,v", [(1, 7), (7, 83), (3, 769), (2, 5125), (1, 4096), (2, 4097), (5, 9000)])
def test_sample_rows_matches_reference(n, v, dtype):
    operands = _operands(n, v, dtype)
    got = sample_rows(*operands)
    _check(got, sample_rows_ref(*operands), operands, dtype)
    assert torch.equal(got[0][operands[2]], operands[0][operands[2]].float().argmax(-1))  # greedy rows: argmax


def test_ties_take_the_first_maximum():
    v = 9000  # three chunks of two tiles; equal maxima in both tiles of the first chunk and in the others
    logits = torch.full((2, v), -5.0)
    logits[:, [17, 2065, 4500, 8999]] = 3.0
    ones = torch.ones(2)
    tok, _, _ = sample_rows(logits, ones, torch.tensor([True, True]), torch.zeros(2, dtype=torch.int64),
                            torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    assert tok.tolist() == [17, 17]


def test_unsound_rows_are_flagged():
    operands = list(_operands(6, 5000, torch.float32, greedy_every=2))
    logits = operands[0]
    logits[0, 4321] = float("nan")
    logits[1, 10] = float("inf")
    logits[2] = float("-inf")           # no finite logit
    logits[3, :4000] = float("-inf")    # masked but for the last chunk: sound
    logits[4, 4999] = float("-inf")
    got = sample_rows(*operands)
    assert got[2].tolist() == [False, False, False, True, True, True]
    _check(got, sample_rows_ref(*operands), operands, torch.float32)
    assert got[0][3] >= 4000


def test_sample_is_a_softmax_draw():
    # 4,000 rows of one 5-token distribution, each with its own seed: the reference's frequencies
    # are near softmax, and the kernel draws the reference's tokens (300 rows: the interpreter is slow)
    n, probs = 4000, torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    operands = (probs.log().expand(n, 5).contiguous(), torch.ones(n), torch.zeros(n, dtype=torch.bool),
                torch.arange(n), torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64))
    tok, lp, _ = sample_rows_ref(*operands)
    freq = torch.bincount(tok, minlength=5).float() / n
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    torch.testing.assert_close(lp, probs.log()[tok], atol=1e-5, rtol=1e-5)
    ktok, klp, _ = sample_rows(*(t[:300] for t in operands))
    assert (ktok == tok[:300]).float().mean() >= 0.99
    torch.testing.assert_close(klp, probs.log()[ktok], atol=1e-5, rtol=1e-5)


def test_shapes_are_checked():
    logits, temperature, greedy, seed, index, step = _operands(3, 83, torch.float32)
    from trtllm.kernels.sample_rows import sample_rows_triton
    with pytest.raises(AssertionError, match="seed"):
        sample_rows_triton(logits, temperature, greedy, seed[:2], index, step)
    with pytest.raises(AssertionError, match="last dim contiguous"):
        sample_rows_triton(logits.t().contiguous().t(), temperature, greedy, seed, index, step)


def test_empty():
    got = sample_rows(*_operands(0, 83, torch.float32))
    assert [t.shape for t in got] == [(0,), (0,), (0,)]


def test_opcheck():
    torch.library.opcheck(torch.ops.trtllm.sample_rows.default, _operands(3, 769, torch.bfloat16))
