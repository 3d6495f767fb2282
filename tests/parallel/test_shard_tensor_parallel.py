"""passes/shard_tensor_parallel.py: a model compiled on 2 (or 4) gloo ranks, each holding its
slice of every layer, gives the single-rank logits (fp32); sizes that do not divide are refused
with the numbers."""
from __future__ import annotations

import pytest
import torch

import trtllm
from tests.models.checkpoints import random_batch, write_checkpoint
from tests.parallel.ranks import run_ranks
from trtllm.contract import CompileError
from trtllm.models.loader import load_model
from trtllm.parallel.tensor_parallel import TensorParallel


def _logits(rank: int, world: int, group_name: str, paths: list[str]):
    results = []
    for path in paths:
        model = load_model(path, dtype=torch.float32, device="cpu")
        compiled = trtllm.compile(model, tensor_parallel=TensorParallel(rank, world, group_name))
        logits = compiled(random_batch(batch=2, seq_len=7), torch.arange(7).expand(2, 7))
        results.append((logits, compiled.attention.num_kv_heads, compiled.matches["shard_tensor_parallel"]))
    return results


def _check_against_one_rank(tmp_path, world: int, local_kv_heads: dict[str, int]):
    paths = [write_checkpoint(family, tmp_path / family) for family in local_kv_heads]
    ranks = run_ranks(_logits, world, [str(p) for p in paths])  # one spawn for every family
    for i, (family, kv_heads) in enumerate(local_kv_heads.items()):
        reference = trtllm.compile(load_model(paths[i], dtype=torch.float32, device="cpu"))(
            random_batch(batch=2, seq_len=7), torch.arange(7).expand(2, 7))
        for logits, heads, matches in (results[i] for results in ranks):
            torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5, msg=family)
            assert heads == kv_heads, family
            assert matches == 2 * 7, family  # per layer: q, k, v, o, gate, up, down


def test_two_ranks_give_the_logits_of_one(tmp_path):
    # llama2: 4 KV heads split 2+2; qwen3: QK-norm, head_dim 32, 2 KV heads; mqa: one KV head,
    # replicated on both ranks
    _check_against_one_rank(tmp_path, 2, {"llama2": 2, "qwen3": 1, "mqa": 1})


@pytest.mark.slow
def test_two_ranks_give_the_logits_of_one_on_more_families(tmp_path):
    # qwen2: q/k/v biases, tied embeddings; gemma2: GELU MLP, sliding windows, final logit
    # soft-capping; gemma3: QK-norm, sandwich norms
    _check_against_one_rank(tmp_path, 2, {"qwen2": 1, "gemma2": 1, "gemma3": 1})


@pytest.mark.slow
def test_four_ranks_give_the_logits_of_one(tmp_path):
    _check_against_one_rank(tmp_path, 4, {"llama31": 1})  # 2 KV heads on 4 ranks: replicated


@pytest.mark.parametrize("family,size,numbers", [
    ("llama2", 3, "num_key_value_heads=4"),       # 4 KV heads on 3 ranks
    ("llama31", 8, "4 heads do not divide"),      # 4 query heads on 8 ranks
])
def test_sizes_that_do_not_divide_are_refused(tmp_path, family, size, numbers):
    model = load_model(write_checkpoint(family, tmp_path), dtype=torch.float32, device="cpu")
    with pytest.raises(CompileError, match=f"{numbers}.* tensor_parallel_size={size}"):
        compiled = trtllm.compile(model, tensor_parallel=TensorParallel(0, size, "never used"))
        compiled(random_batch(batch=1, seq_len=3), torch.arange(3)[None])


class _FusedQkv(torch.nn.Module):
    """A model-native fused qkv_proj, sliced into its parts in order (`interleaved=False`, as
    Phi-3) or viewed per head with q, k, v interleaved (as BLOOM's query_key_value)."""

    def __init__(self, interleaved: bool):
        super().__init__()
        self.interleaved = interleaved
        self.qkv_proj = torch.nn.Linear(16, 48, bias=False)
        self.o_proj = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):  # [B, S, 16]
        B, S, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, S, 48]
        if self.interleaved:
            q, k, v = qkv.view(B, S, 2, 3, 8).unbind(3)  # [B, S, 2, 8] each
        else:
            q, k, v = (qkv[..., i * 16:(i + 1) * 16].view(B, S, 2, 8) for i in range(3))
        return self.o_proj((q * k * v).reshape(B, S, 16))


@pytest.mark.parametrize("interleaved", [False, True])
def test_a_fused_projection_splits_into_its_parts_or_is_refused_by_name(interleaved):
    from tests.passes.graph_capture import Captured
    from trtllm.passes.shard_tensor_parallel import shard_tensor_parallel

    cap = Captured(_FusedQkv(interleaved), torch.randn(1, 3, 16))
    cap.ctx.tensor_parallel = TensorParallel(0, 2, "unused")  # the pass only; nothing runs
    if interleaved:
        with pytest.raises(CompileError, match=r"model-native fused projection \(qkv_proj\) is split .* only as"):
            cap.apply(shard_tensor_parallel)
        return
    assert cap.apply(shard_tensor_parallel) == 4  # q, k, v parts (column), o_proj (row)
    linears = [n for n in cap.gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    weights = [cap.inputs.tensor(n.args[1]) for n in linears[:3]]
    qkv = next(t for t in cap.example_inputs if t.shape == (48, 16))
    for i, part in enumerate(weights):  # rank 0 of 2: the first head (8 rows) of each 16-row part
        torch.testing.assert_close(part, qkv[i * 16:i * 16 + 8])
