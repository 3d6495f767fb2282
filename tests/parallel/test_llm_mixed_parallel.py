"""The random request mixes of tests/runtime/test_mixed_workloads.py on two ranks (CPU, gloo):
tensor parallelism and a two-stage pipeline, with preemption, chunked prefill, the prefix cache,
beams, n > 1, guided requests and aborts mid-run; and the image mixes of test_multimodal_mixes.py on
a LLaVA-NeXT engine. Each request gives what it gives alone on the same ranks, and nothing is left
in rank 0's engine."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.models.checkpoints import write_checkpoint
from tests.models.multimodal_checkpoints import write_llava
from tests.runtime.test_mixed_workloads import VOCAB, check_mix, request
from tests.runtime.test_multimodal_mixes import IMAGES, image_request
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, BuildConfig, KvCacheConfig

pytestmark = pytest.mark.usefixtures("reference_ops")


def two_rank_llm(path, parallel: str, max_tokens: int, max_seq_len: int):
    """An engine on two CPU ranks ("tp2" or "pp2") for all of a test's examples (hypothesis reuses
    a function's fixtures), gone with its worker by the test's end."""
    sizes = {"tensor_parallel_size": 2} if parallel == "tp2" else {"pipeline_parallel_size": 2}
    with LLM(str(path), dtype="float32", device="cpu", **sizes,
             kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=max_tokens),
             build_config=BuildConfig(max_batch_size=6, max_num_tokens=16, max_seq_len=max_seq_len,
                                      max_beam_width=2)) as llm:
        llm.adapters = [None]
        yield llm


@pytest.fixture(params=["tp2", "pp2"])
def llm(request, tmp_path_factory):
    path = write_checkpoint("llama31", tmp_path_factory.mktemp("mixed_parallel"), vocab_size=VOCAB)
    make_tokenizer(path)
    yield from two_rank_llm(path, request.param, max_tokens=96, max_seq_len=48)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request(), min_size=2, max_size=5))
def test_a_mix_on_two_ranks_gives_each_request_its_own_output(llm, requests):
    check_mix(llm, requests)


@pytest.fixture(params=["tp2", "pp2"])
def llava_llm(request, tmp_path_factory):
    """A LLaVA-NeXT engine on two ranks (the tower on rank 0, its features sent with each step)."""
    path = write_llava(tmp_path_factory.mktemp("mixed_parallel_llava"), "llava_next")
    yield from two_rank_llm(path, request.param, max_tokens=448, max_seq_len=256)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_image_mix_on_two_ranks_gives_each_request_its_own_output(llava_llm, data):
    check_mix(llava_llm, data.draw(st.lists(image_request(), min_size=2, max_size=4)))
    assert llava_llm.engine.runner.multimodal.cache.num_encoded <= len(IMAGES)
