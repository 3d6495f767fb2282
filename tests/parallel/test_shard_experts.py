"""passes/shard_experts.py and passes/shard_vocab_parallel.py: an HF MoE checkpoint compiled on 2
(or 4) gloo ranks, each loading only its experts (or its slice of every expert's width), its
attention heads and its vocabulary rows, gives the single-rank logits (fp32); the sizes follow
TensorRT-LLM's rule (parallel/expert_parallel.py)."""
from __future__ import annotations

import pytest
import torch

import trtllm
from tests.models.checkpoints import random_batch, write_checkpoint
from tests.parallel.ranks import run_ranks
from trtllm.contract import CompileError
from trtllm.models.loader import load_model
from trtllm.parallel.expert_parallel import ExpertParallel, resolve_moe_sizes
from trtllm.parallel.process_group import Groups
from trtllm.parallel.rank_model import RankSpec, compile_rank, load_rank, loaded_bytes
from trtllm.parallel.tensor_parallel import TensorParallel
from trtllm.passes import PASSES
from trtllm.passes.shard_vocab_parallel import shard_vocab_parallel

pytestmark = pytest.mark.usefixtures("reference_ops")

IDS, POSITIONS = random_batch(batch=2, seq_len=7), torch.arange(7).expand(2, 7)


def _logits(rank: int, world: int, group_name: str, runs: list[tuple[str, int]]):
    results = []
    for path, moe_ep in runs:
        if path.endswith(" in memory"):  # the whole model loaded, each rank narrowing its slices
            model = load_model(path.removesuffix(" in memory"), dtype=torch.float32, device="cpu")
            tp = TensorParallel(rank, world, group_name, moe=ExpertParallel(moe_ep, world // moe_ep))
            compiled = trtllm.compile(model, tensor_parallel=tp)
            results.append((compiled(IDS, POSITIONS), dict(compiled.matches), 0))
            continue
        spec = RankSpec(path, torch.float32, world, "cpu", 16, {}, 60.0, moe_expert_parallel_size=moe_ep)
        model, slices = load_rank(spec, rank, torch.device("cpu"))
        compiled = compile_rank(model, slices, spec, rank, Groups(group_name, None))
        results.append((compiled(IDS, POSITIONS), dict(compiled.matches), loaded_bytes(model, slices)))
    return results


def _check(tmp_path, world: int, runs: dict[str, tuple[str, int]], moe_blocks: dict[str, int]):
    paths = {family: write_checkpoint(family, tmp_path / family) for family, _ in runs.values()}
    in_memory = [label.endswith(" in memory") for label in runs]
    ranks = run_ranks(_logits, world, [(str(paths[family]) + (" in memory" if memory else ""), ep)
                                       for (family, ep), memory in zip(runs.values(), in_memory)])  # one spawn
    for i, (label, (family, _)) in enumerate(runs.items()):
        model = load_model(paths[family], dtype=torch.float32, device="cpu")
        whole = sum(p.numel() * p.element_size() for p in model.parameters())
        reference = trtllm.compile(model)(IDS, POSITIONS)
        for logits, matches, nbytes in (results[i] for results in ranks):
            torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5, msg=label)
            assert matches["shard_experts"] == moe_blocks[family], label
            assert matches["shard_vocab_parallel"] == 2, label  # the embedding, the head
            assert in_memory[i] or nbytes < whole / world * 1.3, label  # all but norms and routers split


def test_two_ranks_of_experts_or_of_their_width_give_the_logits_of_one(tmp_path):
    # EP=2: experts 0-1 on rank 0, 2-3 on rank 1; MTP=2 (tensor_parallel_size alone): every
    # expert on both, half its width each. Qwen3-MoE: layer 0 dense, QK-norm, renormalised top-2
    _check(tmp_path, 2, {"qwen3_moe ep2": ("qwen3_moe", 2), "qwen3_moe mtp2": ("qwen3_moe", 1)}, {"qwen3_moe": 1})


@pytest.mark.slow
def test_two_ranks_give_the_logits_of_one_on_mixtral_and_qwen2_moe(tmp_path):
    # Qwen2-MoE: a shared expert (split as a dense MLP) with its sigmoid gate beside the experts
    _check(tmp_path, 2, {"mixtral ep2": ("mixtral", 2), "mixtral mtp2": ("mixtral", 1),
                         "qwen2_moe ep2": ("qwen2_moe", 2)}, {"mixtral": 2, "qwen2_moe": 2})


@pytest.mark.slow
def test_four_ranks_give_the_logits_of_one(tmp_path):
    # EP=4: one expert a rank, top-2 (k above the rank's experts); EP=2 x MTP=2, from the
    # checkpoint and from a model in memory (each rank narrowing the whole weights)
    _check(tmp_path, 4, {"ep4": ("qwen3_moe", 4), "ep2 x mtp2": ("qwen3_moe", 2),
                         "ep2 x mtp2 in memory": ("qwen3_moe", 2)}, {"qwen3_moe": 1})


def test_a_pass_list_that_leaves_a_stand_in_read_whole_is_refused(tmp_path):
    # without shard_vocab_parallel the rank's embedding (not loaded: it reads its rows only) would
    # be read as the stand-in's zeros
    path = write_checkpoint("qwen3_moe", tmp_path / "qwen3_moe")
    spec = RankSpec(str(path), torch.float32, 2, "cpu", 16, {}, 60.0, moe_expert_parallel_size=2)
    model, slices = load_rank(spec, 0, torch.device("cpu"))
    tp = TensorParallel(0, 2, "never used", read_slice=slices, moe=ExpertParallel(2, 1),
                        read_experts=slices.read_experts)
    compiled = trtllm.compile(model, tensor_parallel=tp, passes=[p for p in PASSES if p is not shard_vocab_parallel])
    with pytest.raises(CompileError, match="this rank loaded only the slices .* reads .*embed_tokens.* whole"):
        compiled(IDS, POSITIONS)


def test_rank_layout_is_tensorrt_llms():
    # TensorRT-LLM's Mapping docstring: 8 GPUs, moe_tp_size=2, moe_ep_size=4 -> moe_ep groups
    # [0, 1, 2, 3], [4, 5, 6, 7]; moe_tp groups [0, 4], [1, 5], [2, 6], [3, 7]
    moe = resolve_moe_sizes(8, 4, 2)
    assert moe == ExpertParallel(moe_ep=4, moe_tp=2)
    assert [moe.ep_rank(r) for r in range(8)] == [0, 1, 2, 3] * 2
    assert [moe.tp_rank(r) for r in range(8)] == [0] * 4 + [1] * 4
    assert moe.experts(5, 16) == (4, 4) and moe.intermediate(5, 64) == (32, 32)


@pytest.mark.parametrize("sizes,resolved", [
    ((4, None, None), (1, 4)),   # neither: TP inside every expert
    ((4, 4, None), (4, 1)),      # one given: the other fills tensor_parallel_size
    ((4, None, 2), (2, 2)),
    ((1, None, None), (1, 1)),
])
def test_sizes_default_as_tensorrt_llms(sizes, resolved):
    moe = resolve_moe_sizes(*sizes)
    assert (moe.moe_ep, moe.moe_tp) == resolved


@pytest.mark.parametrize("sizes,numbers", [
    ((2, 4, None), r"tensor_parallel_size=2 must equal .* got 0 \* 4"),
    ((4, 3, None), r"tensor_parallel_size=4 must equal .* got 1 \* 3"),
    ((4, 2, 1), r"tensor_parallel_size=4 must equal .* got 1 \* 2"),
    ((2, -1, None), "moe_expert_parallel_size must be a positive integer, got -1"),
])
def test_sizes_that_do_not_multiply_to_the_tensor_parallel_size_are_refused(sizes, numbers):
    with pytest.raises(ValueError, match=numbers):
        resolve_moe_sizes(*sizes)
