"""DeepSeek-V3's MTP layer on a GPU (skipped without one): the engine with CUDA graphs (the
target's decode graphs stashing its last state, the layer's chained decode graphs over its
latent cache) proposes the drafts the same engine proposes with graphs off, on the same
device, and the output is the plain target's. (On the CPU, tests/runtime/test_mtp.py checks
the drafts against HF.)"""
import pytest
import torch

from tests.runtime.test_eagle3 import _recording
from tests.runtime.test_mtp import (
    PROMPTS,
    small_llm,
    target as target,  # noqa: F401  (fixture)
)
from trtllm import MTPDecodingConfig
from trtllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _drafts(target, graphs: bool):  # noqa: F811
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with small_llm(target, speculative_config=MTPDecodingConfig(max_draft_len=3), enable_cuda_graph=graphs) as llm:
        calls = []
        proposer = llm.engine.speculative.draft
        proposer.propose = _recording(proposer, calls)
        out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        if graphs:
            assert proposer.runner.cuda_graphs.decode and llm.engine.runner.cuda_graphs.decode
    return out, calls


def test_graphs_propose_what_eager_steps_propose(target):  # noqa: F811
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    eager_out, eager_calls = _drafts(target, graphs=False)
    graph_out, graph_calls = _drafts(target, graphs=True)
    assert eager_out == graph_out == expected
    assert len(graph_calls) > 5
    eager = {tuple(c): d for c, d in eager_calls}
    same = [eager.get(tuple(c)) == d for c, d in graph_calls]
    assert all(same), f"{same.count(False)} of {len(same)} proposals differ"
