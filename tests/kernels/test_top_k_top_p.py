import pytest
import torch

from trtllm.kernels.top_k_top_p import top_k_top_p, top_k_top_p_ref

NEG_INF = float("-inf")


def _mass_above(x: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over runs of equal values (ascending): each run's value, its mass, and the mass of the
    values above it; and each token's run."""
    values, run = torch.unique(x, return_inverse=True)
    mass = torch.zeros(len(values), dtype=probs.dtype).index_add_(0, run, probs)
    above = mass.flip(0).cumsum(0).flip(0) - mass
    return values, mass, above, run


def _kept_by_k(x: torch.Tensor, k: int) -> torch.Tensor:
    return x >= x.sort(descending=True).values[k - 1] if k < x.numel() else torch.ones_like(x, dtype=torch.bool)


def _expected(x: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """The kept mask by the rule's words, in float64: top-k keeps x >= the k-th largest; top-p
    keeps a value when the mass strictly above it is < p."""
    kept = _kept_by_k(x, k)
    if p < 1.0:
        _, _, above, run = _mass_above(x, torch.where(kept, x.double(), NEG_INF).softmax(-1))
        kept &= above[run] < p
    return kept


def _clear_top_p(x: torch.Tensor, k: int, g: torch.Generator) -> float:
    """A top_p halfway between the masses above two adjacent runs of equal values, so rounding
    cannot move the boundary: runs of at least 1e-3 of the mass."""
    _, mass, above, _ = _mass_above(x, torch.where(_kept_by_k(x, k), x.double(), NEG_INF).softmax(-1))
    wide = (mass > 1e-3).nonzero()[:, 0]
    r = wide[torch.randint(len(wide), (1,), generator=g)].item()
    return float(above[r] + mass[r] / 2)


def _operands(n: int, v: int, seed: int, ties: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    if ties:  # bf16 logits upcast, as the sampler gets them: many equal values
        x = x.to(torch.bfloat16).float()
    ks, ps = [], []
    for i in range(n):  # off, top-k, top-p, both, in turn
        k = v if i % 4 in (0, 2) else int(torch.randint(1, min(v, 60) + 1, (1,), generator=g))
        ks.append(k)
        ps.append(_clear_top_p(x[i], k, g) if i % 4 in (2, 3) else 1.0)
    return x, torch.tensor(ks), torch.tensor(ps, dtype=torch.float32)


@pytest.mark.parametrize("ties", [False, True], ids=["fp32", "bf16-ties"])
@pytest.mark.parametrize("n,v", [(1, 7), (7, 83), (4, 769), (4, 5125), (4, 9000)])
def test_kept_tokens_follow_the_rule(n, v, ties):
    x, top_k, top_p = _operands(n, v, seed=n * v, ties=ties)
    got, want = top_k_top_p(x, top_k, top_p), top_k_top_p_ref(x, top_k, top_p)
    for i in range(n):
        mask = _expected(x[i], int(top_k[i]), float(top_p[i]))
        assert torch.equal(got[i].isfinite(), mask), (i, int(top_k[i]), float(top_p[i]))
        assert torch.equal(want[i].isfinite(), mask), (i, int(top_k[i]), float(top_p[i]))
        assert torch.equal(got[i][mask], x[i][mask])  # kept values untouched


def test_ties_at_either_threshold_are_all_kept():
    x = torch.tensor([[3.0, 1.0, 1.0, 0.0, -0.0, -2.0],    # k = 2: 3 and both 1s
                      [3.0, 1.0, 1.0, 0.0, -0.0, -2.0],    # k = 4: +0.0 and -0.0 are one value
                      [2.0, 2.0, 0.0, 0.0, 0.0, 0.0],      # top_p 0.3: one 2.0 holds less, both kept
                      [2.0, 1.0, 1.0, 1.0, NEG_INF, 0.0]])  # top_p 0.999: the -inf stays out
    top_k = torch.tensor([2, 4, 6, 6])
    top_p = torch.tensor([1.0, 1.0, 0.3, 0.999])
    want = [[True, True, True, False, False, False], [True, True, True, True, True, False],
            [True, True, False, False, False, False], [True, True, True, True, False, True]]
    for op in (top_k_top_p, top_k_top_p_ref):
        assert op(x, top_k, top_p).isfinite().tolist() == want, op


def test_a_tiny_top_p_keeps_the_maximum_and_masked_rows_pass_through():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5000, generator=g)
    x[0, 4321] = 9.0
    x[1] = NEG_INF                     # every token banned: stays so
    x[2, :4990] = NEG_INF              # ten left, in the last of two chunks
    top_k = torch.tensor([5000, 5000, 3])
    top_p = torch.tensor([1e-6, 0.5, 1.0])
    got = top_k_top_p(x, top_k, top_p)
    assert got[0].isfinite().nonzero()[:, 0].tolist() == [4321]
    assert not got[1].isfinite().any()
    assert got[2].isfinite().sum() == 3 and got[2].isfinite()[4990:].sum() == 3
    assert torch.equal(got.isfinite(), top_k_top_p_ref(x, top_k, top_p).isfinite())


def test_opcheck():
    x, top_k, top_p = _operands(4, 300, seed=1, ties=False)
    torch.library.opcheck(torch.ops.trtllm.top_k_top_p.default, (x, top_k, top_p))
