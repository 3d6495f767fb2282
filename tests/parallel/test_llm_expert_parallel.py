"""LLM(path, tensor_parallel_size=2, moe_expert_parallel_size=2) on CPU (gloo): each rank holds half
the experts (and half the vocabulary, half the attention heads), loading only those from the
checkpoint; greedy tokens are one rank's (fp32) with chunked prefill and preemption; bad sizes and
features that cannot run with it are refused before any process starts, naming the numbers."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.models.checkpoints import write_checkpoint
from tests.parallel.test_llm_tensor_parallel import greedy, small_llm
from tests.runtime.tokenizers import make_tokenizer
from trtllm import SamplingParams
from trtllm.config import BuildConfig, LoraConfig
from trtllm.runtime.speculative.config import NGramDecodingConfig

pytestmark = pytest.mark.usefixtures("reference_ops")


def checkpoint(family: str, tmp_path, **overrides):
    path = write_checkpoint(family, tmp_path / family, vocab_size=512, **overrides)
    make_tokenizer(path)
    return path


def replicated_and_whole_bytes(path) -> tuple[int, int]:
    """(bytes every rank reads whole: norms and routers, bytes of the checkpoint)."""
    replicated = whole = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            nbytes = t.numel() * t.element_size()
            whole += nbytes
            if "norm" in name or name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight")):
                replicated += nbytes
    return replicated, whole


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_two_expert_parallel_ranks_give_one_ranks_tokens_each_loading_half_the_experts(tmp_path, family):
    path = checkpoint(family, tmp_path)
    with small_llm(path, max_num_tokens=8, max_tokens=64) as llm:
        expected = greedy(llm)
    with small_llm(path, max_num_tokens=8, max_tokens=64, tensor_parallel_size=2, moe_expert_parallel_size=2) as llm:
        assert greedy(llm) == expected
        assert llm.engine_stats().num_preemptions > 0
        assert llm.compiled.matches["shard_experts"] >= 1
        # everything but the norms and routers is split in two: the experts 2 + 2 of 4, attention
        # heads, the dense layer's MLP, embedding and head by vocabulary
        replicated, whole = replicated_and_whole_bytes(path)
        assert llm.compiled.tensor_parallel.workers.loaded_bytes() == [replicated + (whole - replicated) // 2] * 2


@pytest.mark.slow
def test_tp_inside_experts_gives_one_ranks_tokens(tmp_path):
    # tensor_parallel_size=2 alone: TensorRT-LLM's default moe_tensor_parallel_size=2, every rank
    # holds every expert, half its intermediate width
    path = checkpoint("qwen3_moe", tmp_path)
    with small_llm(path) as llm:
        expected = greedy(llm)
    with small_llm(path, tensor_parallel_size=2) as llm:
        assert greedy(llm) == expected
        assert llm.compiled.tensor_parallel.moe.moe_tp == 2


@pytest.mark.slow
def test_four_ranks_two_expert_parallel_by_two_inside_experts(tmp_path):
    path = checkpoint("qwen3_moe", tmp_path)
    with small_llm(path) as llm:
        expected = greedy(llm)
    with small_llm(path, tensor_parallel_size=4, moe_expert_parallel_size=2) as llm:
        assert greedy(llm) == expected
        assert llm.compiled.tensor_parallel.moe.moe_tp == 2


def test_two_pipeline_stages_of_a_mixture_of_experts_model_give_one_ranks_tokens_each_loading_its_layers(tmp_path):
    # one loader for both: the stage filter leaves the other stage's tensors unloaded, this stage's
    # experts are read whole (one tensor-parallel rank: nothing splits them)
    path = checkpoint("qwen3_moe", tmp_path)  # layer 0 dense, layer 1 MoE
    with small_llm(path, max_num_tokens=8, max_tokens=64) as llm:
        expected = greedy(llm)
        params = {n: p.numel() * p.element_size() for n, p in llm.compiled.module.named_parameters()}
    with small_llm(path, max_num_tokens=8, max_tokens=64, pipeline_parallel_size=2) as llm:
        assert (llm.compiled.pipeline.first_layer, llm.compiled.pipeline.end_layer) == (0, 1)
        assert greedy(llm) == expected
        assert llm.engine_stats().num_preemptions > 0
        stage0 = sum(b for n, b in params.items() if "layers.0." in n or "embed_tokens" in n)
        assert llm.compiled.tensor_parallel.workers.loaded_bytes() == [stage0, sum(params.values()) - stage0]


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.experts.2.up_proj.weight",
                                    "model.layers.1.self_attn.q_proj.weight"])
def test_an_integer_weight_of_a_stage_is_refused_naming_it(tmp_path, tensor):
    # a stage's experts read whole, and its other tensors, were cast to the model's dtype: integer
    # weights served as numbers (the single-process loader and CheckpointSlices refuse them)
    path = checkpoint("qwen3_moe", tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[tensor] = (tensors[tensor] * 100).to(torch.int32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match=rf"tensor '{re.escape(tensor)}' is torch.int32, but it is a weight"):
        small_llm(path, max_num_tokens=8, max_tokens=64, pipeline_parallel_size=2)


@pytest.mark.slow
def test_two_stages_by_two_expert_parallel_ranks_give_one_ranks_tokens(tmp_path):
    path = checkpoint("mixtral", tmp_path, num_hidden_layers=4)
    with small_llm(path, max_num_tokens=8, max_tokens=64) as llm:
        expected = greedy(llm)
    with small_llm(path, max_num_tokens=8, max_tokens=64, tensor_parallel_size=2, moe_expert_parallel_size=2,
                   pipeline_parallel_size=2) as llm:
        assert (llm.compiled.pipeline.first_layer, llm.compiled.pipeline.end_layer) == (0, 2)
        assert greedy(llm) == expected
        assert llm.compiled.matches["shard_experts"] >= 1 and llm.compiled.tensor_parallel.moe.moe_ep == 2
        loaded = llm.compiled.tensor_parallel.workers.loaded_bytes()
        assert len(loaded) == 4 and loaded[0] == loaded[1] and loaded[2] == loaded[3]


@pytest.mark.parametrize("family,overrides,kwargs,why", [
    ("qwen3_moe", {}, dict(moe_expert_parallel_size=2),
     r"tensor_parallel_size=1 must equal moe_tensor_parallel_size \* moe_expert_parallel_size, got 0 \* 2"),
    ("qwen3_moe", {}, dict(tensor_parallel_size=2, moe_expert_parallel_size=2, moe_tensor_parallel_size=2),
     r"tensor_parallel_size=2 must equal moe_tensor_parallel_size \* moe_expert_parallel_size, got 2 \* 2"),
    ("qwen3_moe", dict(num_experts=6), dict(tensor_parallel_size=4, moe_expert_parallel_size=4),
     "num_experts=6 does not divide among moe_expert_parallel_size=4"),
    ("qwen3_moe", dict(moe_intermediate_size=30), dict(tensor_parallel_size=4),
     "the experts' intermediate_size=30 does not divide among moe_tensor_parallel_size=4"),
    ("qwen3_moe", dict(vocab_size=511), dict(tensor_parallel_size=2),
     "vocab_size=511 does not divide among tensor_parallel_size=2"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=50), dict(tensor_parallel_size=4),
     "shared_expert_intermediate_size=50 does not divide among tensor_parallel_size=4"),
    ("llama31", dict(vocab_size=511), dict(tensor_parallel_size=2),
     "vocab_size=511 does not divide among tensor_parallel_size=2"),
    ("llama31", {}, dict(tensor_parallel_size=2, moe_expert_parallel_size=2),
     "moe_expert_parallel_size=2: LlamaForCausalLM is not a mixture-of-experts model"),
    ("qwen3_moe", {}, dict(tensor_parallel_size=2, moe_expert_parallel_size=0),
     "moe_expert_parallel_size must be a positive integer, got 0"),
])
def test_bad_sizes_are_refused_before_any_process_starts(tmp_path, family, overrides, kwargs, why):
    path = write_checkpoint(family, tmp_path / family, **{"vocab_size": 512, **overrides})
    make_tokenizer(path)
    with pytest.raises(ValueError, match=why):
        small_llm(path, **kwargs)


def test_ngram_speculation_with_expert_parallelism_gives_one_ranks_tokens(tmp_path):
    # proposed on rank 0, verified by every rank: TP2 x EP2 runs the verify steps' MoE layers split
    path = checkpoint("qwen3_moe", tmp_path)
    prompts = [[5, 6, 7, 8] * 3 + [5, 6], [3, 4, 5] * 3, list(range(200, 214))]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with small_llm(path, max_num_tokens=8) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with small_llm(path, max_num_tokens=8, tensor_parallel_size=2, moe_expert_parallel_size=2,
                   speculative_config=NGramDecodingConfig(max_draft_len=4)) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        assert vars(llm.engine_stats())["spec_accepted_tokens"] > 0


def test_lora_on_attention_runs_under_expert_parallelism(tmp_path):
    # an attention adapter on Qwen3-MoE (transformers' module: its paths under HFCausalLM's `model.`) at
    # TP2 x EP2: every rank writes its part of it; the base and the adapter give one rank's tokens
    from tests.lora_adapters import write_adapter
    from trtllm import LoRARequest
    path = checkpoint("qwen3_moe", tmp_path)
    write_adapter(path, tmp_path / "adapter", r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    request = LoRARequest("attention", 1, str(tmp_path / "adapter"))
    prompts = [[5, 17, 99, 3, 250, 31, 8], [400, 2]] * 2
    requests = [request, request, None, None]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def tokens(llm):
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
        return [o.outputs[0].token_ids for o in outs]
    with small_llm(path, lora_config=LoraConfig(max_lora_rank=8)) as llm:
        expected = tokens(llm)
    assert expected[:2] != expected[2:], "the adapter changes nothing: the test could not fail"
    with small_llm(path, lora_config=LoraConfig(max_lora_rank=8), tensor_parallel_size=2,
                   moe_expert_parallel_size=2) as llm:
        assert tokens(llm) == expected


def test_serve_ep_size_is_moe_expert_parallel_size_and_a_bad_one_fails_the_start_naming_the_numbers(tmp_path):
    from trtllm.cli.serve import engine_options, parse_args
    from trtllm.runtime.build_engine import build_engine

    path = checkpoint("qwen3_moe", tmp_path)
    assert engine_options(parse_args([str(path), "--tp_size", "2", "--ep_size", "2"]))["moe_expert_parallel_size"] == 2
    assert engine_options(parse_args([str(path)]))["moe_expert_parallel_size"] is None
    options = engine_options(parse_args([str(path), "--ep_size", "2", "--dtype", "float32"]))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=1 must equal .* got 0 \* 2"):
        build_engine(str(path), **options)


@pytest.mark.slow
def test_serve_tp_2_ep_2_serves_one_ranks_text(tmp_path):
    from tests.serve.server import BUILD, KV_MAX_TOKENS, Server
    from trtllm import LLM, SamplingParams
    from trtllm.config import KvCacheConfig

    path = checkpoint("qwen3_moe", tmp_path)
    prompts = ["Hello there", "The quick brown fox jumps"]
    with Server(path, "--tp_size", "2", "--ep_size", "2", "--max_beam_width", "1",
                log_path=tmp_path / "server.log") as server:
        served = [server.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 8,
                                                       "temperature": 0, "ignore_eos": True}).json()
                  for p in prompts]
        assert server.stop() == 0, server.log()
    with LLM(str(path), dtype="float32", build_config=BuildConfig(**BUILD),
             kv_cache_config=KvCacheConfig(max_tokens=KV_MAX_TOKENS)) as llm:
        offline = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert [r["choices"][0]["text"] for r in served] == [o.outputs[0].text for o in offline]
