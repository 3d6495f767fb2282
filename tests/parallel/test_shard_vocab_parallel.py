"""passes/shard_vocab_parallel.py: the embedding and the LM head split by vocabulary on 2 gloo ranks
give the single-rank logits (fp32), each rank holding half of each (one half for tied embeddings);
a head left in the graph is split there."""
from __future__ import annotations

import pytest
import torch

import trtllm
from tests.models.checkpoints import random_batch, write_checkpoint
from tests.parallel.ranks import run_ranks
from trtllm.models.loader import load_model
from trtllm.parallel.process_group import Groups
from trtllm.parallel.rank_model import RankSpec, compile_rank, load_rank
from trtllm.passes import PASSES
from trtllm.passes.split_lm_head import split_lm_head

pytestmark = pytest.mark.usefixtures("reference_ops")

IDS, POSITIONS = random_batch(batch=2, seq_len=7), torch.arange(7).expand(2, 7)


WITHOUT_SPLIT_HEAD = [p for p in PASSES if p is not split_lm_head]


def _logits(rank: int, world: int, group_name: str, runs: list[tuple[str, bool]]):
    results = []
    for path, split_head in runs:
        spec = RankSpec(path, torch.float32, world, "cpu", 16, {} if split_head else {"passes": WITHOUT_SPLIT_HEAD})
        model, slices = load_rank(spec, rank, torch.device("cpu"))
        compiled = compile_rank(model, slices, spec, rank, Groups(group_name, None))
        logits = compiled(IDS, POSITIONS)
        vocab = [tuple(t.shape) for key, t in compiled.tensor_parallel._made.items() if key[0] == "vocab"]
        results.append((logits, vocab, compiled.matches["shard_vocab_parallel"],
                        compiled.variants[-1].lm_head is not None
                        and "on this rank's vocabulary rows, all-gathered" in compiled.summary()))
    return results


def test_two_ranks_hold_half_the_vocabulary_each_and_give_the_logits_of_one(tmp_path):
    # qwen2: tied (one slice serves both); llama2 with the head left in the graph (no
    # split_lm_head): rewritten there, the all-gather inside the graph. (A head split out of an
    # untied model: tests/parallel/test_llm_tensor_parallel.py.)
    runs = {"qwen2 tied": ("qwen2", True), "llama2 head in graph": ("llama2", False)}
    paths = {family: write_checkpoint(family, tmp_path / family) for family, _ in runs.values()}
    ranks = run_ranks(_logits, 2, [(str(paths[family]), split) for family, split in runs.values()])
    for i, (label, (family, split_head)) in enumerate(runs.items()):
        reference = trtllm.compile(load_model(paths[family], dtype=torch.float32, device="cpu"))(IDS, POSITIONS)
        for logits, vocab, matches, head in (results[i] for results in ranks):
            torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5, msg=label)
            assert matches == 2, label
            assert vocab == [(64, 64)] * (1 if family == "qwen2" else 2), label  # 128 rows / 2 ranks
            assert head == split_head, label
