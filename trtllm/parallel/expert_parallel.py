"""Expert parallelism and TP inside experts: how a tensor-parallel group of N ranks splits the
MoE layers, with TensorRT-LLM's sizes and rank layout (its `Mapping`):

    moe_tensor_parallel_size * moe_expert_parallel_size == tensor_parallel_size
    neither given: moe_tp = tensor_parallel_size, moe_ep = 1  (every rank: every expert, 1/N of its width)
    one given:     the other is tensor_parallel_size // it
    moe_ep_rank = rank % moe_ep;  moe_tp_rank = rank // moe_ep
    rank r holds experts [moe_ep_rank * E/moe_ep, (moe_ep_rank + 1) * E/moe_ep), and of each its
    intermediate features [moe_tp_rank * I/moe_tp, (moe_tp_rank + 1) * I/moe_tp)

Attention and the dense layers stay split N ways (passes/shard_tensor_parallel.py); the MoE
layers are split by passes/shard_experts.py. So `LLM(path, moe_expert_parallel_size=2)` alone is
refused, as TensorRT-LLM refuses it (1 != moe_tp 0 * moe_ep 2): expert parallelism needs
`tensor_parallel_size=2` too.

Vocabulary-parallel embedding and LM head (passes/shard_vocab_parallel.py) need the vocabulary
to divide among the N ranks (`check_vocab`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertParallel:
    """How the MoE layers of a tensor-parallel group of `moe_tp * moe_ep` ranks are split."""
    moe_ep: int  # moe_expert_parallel_size
    moe_tp: int  # moe_tensor_parallel_size

    def ep_rank(self, rank: int) -> int:
        return rank % self.moe_ep

    def tp_rank(self, rank: int) -> int:
        return rank // self.moe_ep

    def experts(self, rank: int, num_experts: int) -> tuple[int, int]:
        """(first expert, number of experts) rank `rank` holds."""
        per = num_experts // self.moe_ep
        return self.ep_rank(rank) * per, per

    def intermediate(self, rank: int, inter: int) -> tuple[int, int]:
        """(first intermediate feature, number of them) of each expert rank `rank` holds."""
        per = inter // self.moe_tp
        return self.tp_rank(rank) * per, per


def _positive(name: str, size) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {size!r}")


def resolve_moe_sizes(tensor_parallel_size: int, moe_expert_parallel_size: int | None = None,
                      moe_tensor_parallel_size: int | None = None) -> ExpertParallel:
    """TensorRT-LLM's defaults and rule (module docstring); a ValueError naming the numbers."""
    _positive("tensor_parallel_size", tensor_parallel_size)
    for name, size in (("moe_expert_parallel_size", moe_expert_parallel_size),
                       ("moe_tensor_parallel_size", moe_tensor_parallel_size)):
        if size is not None:
            _positive(name, size)
    ep, tp = moe_expert_parallel_size, moe_tensor_parallel_size
    if ep is None and tp is None:
        ep, tp = 1, tensor_parallel_size
    elif tp is None:
        tp = tensor_parallel_size // ep
    elif ep is None:
        ep = tensor_parallel_size // tp
    if ep * tp != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must equal moe_tensor_parallel_size * "
                         f"moe_expert_parallel_size, got {tp} * {ep} (the MoE layers split the tensor-parallel "
                         f"ranks, as TensorRT-LLM's do: moe_expert_parallel_size={ep} needs tensor_parallel_size="
                         f"{ep * max(tp, 1)})")
    return ExpertParallel(ep, tp)


def check_moe_sizes(moe: ExpertParallel, *, num_experts: int, moe_intermediate_size: int) -> None:
    """Refuse experts or expert widths that do not divide, with the numbers."""
    if num_experts % moe.moe_ep:
        raise ValueError(f"num_experts={num_experts} does not divide among moe_expert_parallel_size={moe.moe_ep}")
    if moe_intermediate_size % moe.moe_tp:
        raise ValueError(f"the experts' intermediate_size={moe_intermediate_size} does not divide among "
                         f"moe_tensor_parallel_size={moe.moe_tp}")


def check_vocab(vocab_size: int, tensor_parallel_size: int) -> None:
    """The embedding and the LM head split by vocabulary rows: the vocabulary must divide."""
    if vocab_size % tensor_parallel_size:
        raise ValueError(f"vocab_size={vocab_size} does not divide among tensor_parallel_size={tensor_parallel_size} "
                         "(the embedding and the LM head are split by vocabulary)")
