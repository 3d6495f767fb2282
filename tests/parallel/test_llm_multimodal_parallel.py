"""Multimodal models (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL) under tensor and pipeline parallelism on
CPU (gloo): rank 0 alone holds and runs the vision side and hands each step's image features to
the other ranks with the step; the language model splits and cuts as a text model's. Greedy
tokens of a batch mixing images and text, with prefill chunks that cut the images, are one
rank's; the other ranks read none of the vision weights."""
from __future__ import annotations

import pytest

from tests.models.multimodal_checkpoints import random_images, write_llava
from tests.models.qwen_vl_checkpoints import IMAGE, write_qwen2_5_vl
from trtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams

pytestmark = pytest.mark.usefixtures("reference_ops")

pytest.importorskip("PIL")

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_5_vl"])
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen2_5_vl":
        return write_qwen2_5_vl(directory), IMAGE
    return write_llava(directory, request.param), "<image>"


def prompts(placeholder: str) -> list:
    a, b = random_images(2, seed=3)
    return [{"prompt": f"USER: {placeholder} What is this? ASSISTANT:", "multi_modal_data": {"image": [a]}},
            "USER: and now text only ASSISTANT:",
            {"prompt": f"USER: {placeholder} and {placeholder}\nCompare. ASSISTANT:",
             "multi_modal_data": {"image": [b, a]}},
            {"prompt": f"USER: {placeholder} What is this? ASSISTANT:", "multi_modal_data": {"image": [b]}}]


def small_llm(path, **options) -> LLM:
    # 16 tokens a step: the prompts' prefills come in chunks that cut the images
    options.setdefault("build_config", BuildConfig(max_batch_size=4, max_num_tokens=16, max_seq_len=256))
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_config=KvCacheConfig(tokens_per_block=16,
                                                                                         max_tokens=1024), **options)


def tokens(llm, placeholder):
    return [o.outputs[0].token_ids for o in llm.generate(prompts(placeholder), PARAMS, use_tqdm=False)]


@pytest.fixture(scope="module")
def expected(family):
    path, placeholder = family
    with small_llm(path) as llm:
        want = tokens(llm, placeholder)
        encoded = llm.engine.runner.multimodal.cache.num_encoded
        vision = sum(p.numel() * p.element_size() for n, p in llm.compiled.module.named_parameters()
                     if not n.startswith("language_model."))
    assert want[0] != want[3], "two images give the same tokens: the test could not fail"
    return want, encoded, vision


def _one_ranks_tokens(family, expected, **sizes) -> list[int]:
    path, placeholder = family
    want, encoded, vision = expected
    with small_llm(path, **sizes) as llm:
        assert tokens(llm, placeholder) == want
        assert llm.engine.runner.multimodal.cache.num_encoded == encoded  # on rank 0, as on one rank
        loaded = llm.compiled.tensor_parallel.workers.loaded_bytes()
    assert loaded[0] > vision  # rank 0: the vision side whole, and its share of the language model
    return loaded


def test_images_on_two_ranks_give_one_ranks_tokens(family, expected):
    loaded = _one_ranks_tokens(family, expected, tensor_parallel_size=2)
    assert loaded[1] < loaded[0] - expected[2] / 2  # rank 1: none of the vision side


@pytest.mark.slow  # the suite's time: a pipeline with images runs in every run with beams (below)
def test_images_on_a_pipeline_give_one_ranks_tokens(family, expected):
    _one_ranks_tokens(family, expected, pipeline_parallel_size=2)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp("llava_combos"), "llava")


def test_fp8_adapters_and_beams_with_images_on_two_ranks_give_one_ranks_tokens(llava, tmp_path):
    # FP8 quantizes the language model's linears only (the vision side stays in the model's dtype, on
    # rank 0); an adapter on the language model splits as on a text model; beams fork image blocks
    # in every stage's cache
    from tests.lora_adapters import write_adapter
    from tests.models.multimodal_checkpoints import hf_llava
    from trtllm import LoraConfig, LoRARequest, QuantAlgo, QuantConfig
    write_adapter(llava, tmp_path / "adapter", targets=r".*language_model.*\.(q_proj|v_proj|down_proj)", seed=7,
                  model=hf_llava(llava))
    adapter = LoRARequest("lm", 1, str(tmp_path / "adapter"))
    batch = prompts("<image>")[:2]
    beams = SamplingParams(max_tokens=5, beam_width=2, n=2, ignore_eos=True)
    for options, requests, params, sizes in [
            (dict(quant_config=QuantConfig(quant_algo=QuantAlgo.FP8)), None, PARAMS, dict(tensor_parallel_size=2)),
            (dict(lora_config=LoraConfig(max_lora_rank=8)), [adapter, adapter], PARAMS, dict(tensor_parallel_size=2)),
            (dict(build_config=BuildConfig(max_batch_size=4, max_num_tokens=16, max_seq_len=256, max_beam_width=2)),
             None, beams, dict(pipeline_parallel_size=2))]:
        got = []
        for ranks in ({}, sizes):
            with small_llm(llava, **{**options, **ranks}) as llm:
                got.append([[c.token_ids for c in o.outputs] for o in llm.generate(batch, params, use_tqdm=False,
                                                                                    lora_request=requests)])
        assert got[1] == got[0], options


def test_an_eagle3_head_with_images_on_two_ranks_gives_one_ranks_tokens(tmp_path):
    # rank 0 runs the head on the target's stashed states (image rows included), every rank the verify steps
    from tests.runtime.test_eagle3 import write_head
    from trtllm import EagleDecodingConfig
    llava = write_llava(tmp_path / "llava4", num_text_layers=4)
    spec = EagleDecodingConfig(max_draft_len=3, speculative_model_dir=str(write_head(tmp_path / "head", aux=[0, 1, 2])))
    batch = prompts("<image>")[:2]
    got = []
    for sizes in ({}, dict(tensor_parallel_size=2)):
        with small_llm(llava, speculative_config=spec, **sizes) as llm:
            got.append([o.outputs[0].token_ids for o in llm.generate(batch, PARAMS, use_tqdm=False)])
            assert vars(llm.engine_stats())["spec_draft_tokens"] > 0
    assert got[1] == got[0]
