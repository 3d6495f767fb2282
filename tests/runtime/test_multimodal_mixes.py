"""Random mixes of image requests (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL) in one engine as a GPU runs it:
decode and prefill steps through CUDA-graph stand-ins (image rows and M-RoPE positions staged before
each replay, decode launched ahead), 16-token chunks that cut the images, a KV pool that preemption must free, the prefix cache
with image keys and the encoder cache. Prompts carry zero to two images drawn from three (the same
image in several requests: encoded once, its blocks shared); what each asks is drawn as in
tests/runtime/test_mixed_workloads.py (greedy, seeded sampling, n = 2, best_of, beams, logprobs,
prompt logprobs, stop tokens, regex-guided, aborted mid-stream). Every request's output equals the
request run alone, no sequence or KV block is left, and each image was encoded once."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.lora_adapters import write_adapter
from tests.models.multimodal_checkpoints import hf_llava, random_images, write_llava
from tests.models.qwen_vl_checkpoints import IMAGE as QWEN_IMAGE, write_qwen2_5_vl
from tests.runtime.test_mixed_workloads import check_mix, request
from tests.runtime.test_model_runner import EagerGraph, add_prefill_graphs
from tests.runtime.test_overlap_scheduler import count_ahead
from trtllm import LLM, BuildConfig, KvCacheConfig, LoraConfig, LoRARequest, NGramDecodingConfig, SchedulerConfig
from trtllm.runtime.cuda_graphs import cuda_graph_batch_sizes

pytest.importorskip("PIL")

IMAGES = random_images(3, seed=11)  # three shapes: LLaVA-NeXT gives them different crop counts
TEXTS = ["USER: {}\nWhat is this? ASSISTANT:", "USER: Look: {} ok ASSISTANT:", "{}"]


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_5_vl", "llava_next+ngram", "llava_next+lora",
                                        "qwen2_5_vl+no_evict"])
def llm(request, tmp_path_factory):
    """The engine; "+ngram": with n-gram speculation (drafts verified beside image prefills); "+lora":
    two adapters on the language model and one GPU slot (requests of the other adapter wait);
    "+no_evict": SchedulerConfig(GUARANTEED_NO_EVICT), admitting only what the pool can finish."""
    family, _, extra = request.param.partition("+")
    directory = tmp_path_factory.mktemp(family)
    path = write_qwen2_5_vl(directory) if family == "qwen2_5_vl" else write_llava(directory, family)
    options, adapters = {}, []
    if extra == "ngram":
        options["speculative_config"] = NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2)
    elif extra == "no_evict":
        options["scheduler_config"] = SchedulerConfig(capacity_scheduler_policy="GUARANTEED_NO_EVICT")
    elif extra == "lora":
        options["lora_config"] = LoraConfig(max_lora_rank=8, max_loras=1, max_cpu_loras=2)
        for i in (1, 2):
            out = tmp_path_factory.mktemp(f"adapter{i}")
            write_adapter(path, out, seed=i, model=hf_llava(path), targets=r".*language_model.*\.(q_proj|v_proj|down_proj)")
            adapters.append(LoRARequest(f"adapter{i}", i, str(out)))
    # a pool of ~two long requests (LLaVA-NeXT's crops: up to ~180 tokens for two images): more preempt
    seq_len, pool = (112, 224) if family == "llava" else (256, 448)
    with LLM(model=str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=pool),
             build_config=BuildConfig(max_batch_size=6, max_num_tokens=16, max_seq_len=seq_len,
                                      max_beam_width=2), **options) as llm:
        runner = llm.engine.runner
        for b in cuda_graph_batch_sizes(runner.meta.max_num_seqs):
            g = EagerGraph(runner, b, 512)
            runner.cuda_graphs.decode[b] = (g, g.logits, g.greedy)
        add_prefill_graphs(llm, 16)
        llm.adapters = [None] + adapters  # check_mix's adapter index picks from these
        llm.image_token = QWEN_IMAGE if family == "qwen2_5_vl" else "<image>"
        llm.launched_ahead = count_ahead(llm)
        yield llm


@st.composite
def image_request(draw, image_token: str = "<image>"):
    """test_mixed_workloads' request with its prompt replaced by text around 0-2 of IMAGES."""
    _, params, abort, adapter = draw(request())
    picks = draw(st.lists(st.integers(0, len(IMAGES) - 1), min_size=0, max_size=2))
    text = draw(st.sampled_from(TEXTS)).format(" and ".join([image_token] * len(picks)) or "Hello there.")
    prompt = {"prompt": text, "multi_modal_data": {"image": [IMAGES[i] for i in picks]}} if picks else text
    return prompt, params, abort, adapter


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_image_mix_gives_each_request_its_own_output(llm, data):
    requests = data.draw(st.lists(image_request(llm.image_token), min_size=2, max_size=5))
    check_mix(llm, requests)
    # each of the three images went through the tower once in this engine's life (its features then
    # come from the encoder cache: for the request alone, after a preemption, for another request)
    assert llm.engine.runner.multimodal.cache.num_encoded <= len(IMAGES)
