"""EAGLE-3 on a GPU (skipped without one): the engine with CUDA graphs (the target's decode,
prefill and verify graphs stashing its states; the head's decode graphs mapping their picks
to the target's vocabulary, its chained steps, its prefill graphs) proposes the drafts the
same engine proposes with graphs off, on the same device, and the output is the plain
target's. (On the CPU, tests/runtime/test_eagle3.py checks the drafts against HF.)"""
import pytest
import torch

from tests.runtime.test_eagle3 import (
    PROMPTS,
    _recording,
    head as head,  # noqa: F401  (fixtures)
    small_llm,
    target as target,  # noqa: F401
)
from trtllm import EagleDecodingConfig
from trtllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _drafts(target, head, graphs: bool):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    cfg = EagleDecodingConfig(max_draft_len=3, speculative_model_dir=str(head))
    with small_llm(target, speculative_config=cfg, enable_cuda_graph=graphs) as llm:
        calls = []
        proposer = llm.engine.speculative.draft
        proposer.propose = _recording(proposer, calls)
        out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        if graphs:
            assert proposer.runner.cuda_graphs.decode and llm.engine.runner.cuda_graphs.verify
    return out, calls


def test_graphs_propose_what_eager_steps_propose(target, head):  # noqa: F811
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    eager_out, eager_calls = _drafts(target, head, graphs=False)
    graph_out, graph_calls = _drafts(target, head, graphs=True)
    assert eager_out == graph_out == expected
    assert len(graph_calls) > 5
    eager = {tuple(c): d for c, d in eager_calls}
    same = [eager.get(tuple(c)) == d for c, d in graph_calls]
    assert all(same), f"{same.count(False)} of {len(same)} proposals differ"


def test_the_demo_head_is_accepted_as_often_as_on_the_cpu():
    """The trained head under Inductor and CUDA graphs: acceptance length > 2, as on the CPU
    (test_eagle3.py); a stash Inductor dropped, or states read from the wrong rows, give ~1."""
    from tests.runtime.test_eagle3 import test_the_demo_models_trained_head_is_accepted_often_and_changes_nothing as on
    on()
