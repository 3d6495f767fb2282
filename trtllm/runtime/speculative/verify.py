"""Verification: which draft tokens the target accepts, and the token that follows them.

The target scores a speculating sequence's last known token and its k draft tokens d_0 ..
d_{k-1} in one forward pass (a k+1-token chunk; runtime/model_runner.py): logits row j is
the target's distribution p_j for the token after d_0 .. d_{j-1}. Then:

- **exact match** (`greedy_accept`): t_j is the token the target's own sampler picks from
  row j, as it would have without speculation (runtime/sampler.py: greedy argmax, or the
  seeded Gumbel sample whose noise is keyed on the output length, so row j uses the same
  noise the plain step would). Accept d_j while d_j == t_j; the first t_j that differs
  (or t_k, the bonus, when all match) is the step's new token. Output is token-identical
  to decoding without speculation, for greedy and seeded sampling alike; for a draft that
  is a fixed token (n-gram, a greedy draft model) this is also exactly rejection sampling
  with a one-hot draft distribution: d_j is accepted with probability p_j(d_j).
- **rejection sampling** (`rejection_sample`, Leviathan et al. 2023 / Chen et al. 2023),
  for a draft token drawn from a draft distribution q_j (a draft model sampling at
  temperature > 0): accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first
  rejection draw from norm(max(0, p_j - q_j)); all accepted: the bonus from p_k. The
  output's distribution is exactly the target's.

Shapes: target_probs [k+1, V], draft_probs [k, V], draft tokens k ints; V the vocabulary.
"""
from __future__ import annotations

import torch
from torch import Tensor


def greedy_accept(draft: list[int], target: list[int]) -> list[int]:
    """The accepted drafts, then the target's own token: `target[j]` is the target's pick
    after draft[:j] (len(target) == len(draft) + 1)."""
    if len(target) != len(draft) + 1:
        raise ValueError(f"{len(target)} target picks for {len(draft)} draft tokens (need one more)")
    a = 0
    while a < len(draft) and draft[a] == target[a]:
        a += 1
    return draft[:a] + [target[a]]


def rejection_sample(target_probs: Tensor, draft_probs: Tensor, draft: list[int],
                     generator: torch.Generator, bonus: int | None = None) -> list[int]:
    """The accepted drafts and the token after them, by rejection sampling (module
    docstring). `bonus`: a sample of target_probs[k] already drawn (the engine's seeded
    Gumbel pick), used when every draft is accepted; None: drawn here."""
    k = len(draft)
    if target_probs.shape[0] != k + 1 or draft_probs.shape[0] != k or target_probs.shape[1] != draft_probs.shape[1]:
        raise ValueError(f"target_probs {tuple(target_probs.shape)} / draft_probs {tuple(draft_probs.shape)} "
                         f"do not fit {k} draft tokens")
    p, q = target_probs.float(), draft_probs.float()
    if k:
        idx = torch.tensor(draft, device=p.device)
        rows = torch.arange(k, device=p.device)
        u = torch.rand(k, generator=generator, device=p.device)
        accepted = (u * q[rows, idx] <= p[rows, idx]).tolist()  # u < p/q, without dividing by q
    else:
        accepted = []
    for j, ok in enumerate(accepted):
        if not ok:
            residual = (p[j] - q[j]).clamp_min(0.0)
            total = residual.sum()
            # p <= q everywhere means p == q: then no draft is ever rejected; rounding aside
            residual = residual / total if total > 0 else p[j]
            return draft[:j] + [int(torch.multinomial(residual, 1, generator=generator))]
    if bonus is None:
        bonus = int(torch.multinomial(p[k], 1, generator=generator))
    return list(draft) + [bonus]


def verify_generator(device: torch.device, seed: int, index: int, step: int) -> torch.Generator:
    """The accept/reject randomness of one sequence's verify step: a pure function of its
    seed, completion index and output length, like the sampler's noise (so preemption or
    batch mates change nothing)."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, index, step, 0x5BEC)) & (2**63 - 1))
    return g
