"""LLM(model=path) for DeepSeek-V2/V3 checkpoints: multi-head latent attention paged as its
latent (passes/place_mla_attention.py, trtllm/mla_attention.py), MoE layers after the dense
first ones fused (fuse_moe). Greedy output equals HF generate token for token (fp32, with
chunked prefill and prefix reuse); the cache holds kv_lora_rank + qk_rope_head_dim values per
token and layer; what the MLA kernels cannot do is refused by name."""
import pytest
import torch

from tests.runtime.test_llm_families import PROMPTS, check_greedy, checkpoint, hf_greedy, llm
from trtllm.config import KvCacheConfig

# family -> (kv_lora_rank + qk_rope_head_dim, MoE layers of 2): tests/models/checkpoints.py's configs
MLA = {"deepseek_v3": (32 + 8, 1), "deepseek_v2": (32 + 8, 1)}


@pytest.mark.parametrize("family", sorted(MLA))
def test_greedy_matches_hf_generate_with_the_latent_paged(family, tmp_path_factory):
    path = checkpoint(family, tmp_path_factory)
    expected, hf_class = hf_greedy(path)
    with llm(path) as engine:
        check_greedy(engine, expected)
        summary, graphs = engine.compiled.summary(), engine.compiled.captures
        cache = engine.engine.runner.cache
    row, moe = MLA[family]
    assert f"HF module {hf_class}" in summary, summary
    assert f"trtllm.mla_attention: {2 * graphs}" in summary, summary
    assert f"trtllm.fused_moe: {moe * graphs}" in summary and "left as captured" not in summary, summary
    assert "trtllm.attention:" not in summary, summary
    # the pool: one latent row of kv_lora_rank + qk_rope_head_dim fp32 values per token and layer
    tokens = cache.num_blocks * cache.block_size
    assert cache.nbytes == tokens * 2 * row * 4, (tuple(cache.k.shape), tuple(cache.v.shape))


def test_beam_search_on_the_latent_cache_equals_hf(tmp_path_factory):
    """Beams share and copy-on-write latent blocks as they do K/V blocks (the empty V pool
    copies as nothing): HF's beam search, token for token."""
    from tests.models.checkpoints import hf_model
    from tests.runtime.test_beams import CASES, beam_params, check_against_hf, engine_of, run
    path = checkpoint("deepseek_v3", tmp_path_factory)
    engine, hf = engine_of(path), hf_model(path)
    requests = {str(i): (p, beam_params(CASES[0])) for i, p in enumerate(PROMPTS[:2])}
    done = run(engine, requests)
    for rid, (prompt, _) in requests.items():
        check_against_hf(hf, done[rid], prompt, CASES[0])
    engine.block_manager.check_invariants()


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_a_quantized_kv_cache_is_refused_by_name(dtype, tmp_path_factory):
    path = checkpoint("deepseek_v2", tmp_path_factory)
    from trtllm.config import BuildConfig
    from trtllm.runtime.llm import LLM
    with pytest.raises(ValueError, match=f"a {dtype.upper()} KV cache with multi-head latent attention"):
        LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(dtype=dtype, max_tokens=256),
            build_config=BuildConfig(max_batch_size=2, max_num_tokens=16, max_seq_len=64))


def test_tensor_parallelism_and_lora_are_refused_by_name(tmp_path_factory):
    import trtllm
    from tests.models.checkpoints import random_batch
    from trtllm.compile import CompileError
    from trtllm.lora_slots import LoraSlots
    from trtllm.models.hf import load_hf_module
    from trtllm.parallel.tensor_parallel import TensorParallel
    path = checkpoint("deepseek_v3", tmp_path_factory)
    model = load_hf_module(path, torch.float32, torch.device("cpu"))
    ids = random_batch(batch=1, seq_len=3)
    for options, why in [(dict(tensor_parallel=TensorParallel(0, 2, "never used")), "with tensor parallelism"),
                         (dict(lora=LoraSlots(2, 8, ["o_proj"], 16, "cpu")), "LoRA with multi-head latent")]:
        with pytest.raises(CompileError, match=f"multi-head latent attention|{why}") as e:
            trtllm.compile(model, **options)(ids, torch.arange(3)[None])
        assert why in str(e.value)


def test_multi_token_prediction_layers_are_skipped(tmp_path_factory):
    """A checkpoint with DeepSeek-V3's MTP layer (model.layers.{num_hidden_layers}.*, as the
    real one ships layer 61) loads, the MTP tensors skipped, and gives HF's tokens; a tensor
    that belongs to no layer is still refused."""
    import json

    from safetensors.torch import load_file, save_file

    from trtllm.models.hf import load_hf_module
    path = checkpoint("deepseek_v3", tmp_path_factory)
    expected, _ = hf_greedy(path)
    config = json.loads((path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 2
    tensors = load_file(path / "model.safetensors")
    mtp = {k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in tensors.items() if "model.layers.1." in k}
    mtp["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    save_file({**tensors, **mtp}, path / "model.safetensors", metadata={"format": "pt"})
    with llm(path) as engine:
        check_greedy(engine, expected)
    save_file({**tensors, **mtp, "model.layers.3.eh_proj.weight": torch.zeros(64, 128)}, path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.3\.eh_proj\.weight"):
        load_hf_module(path, torch.float32, torch.device("cpu"))


def test_speculative_decoding_verifies_on_the_latent_cache(tmp_path_factory):
    """n-gram drafts verified by steps of several tokens a sequence (each token a decode query
    over the cached latent, trtllm/mla_attention.py): HF's greedy tokens."""
    from tests.models.checkpoints import hf_model
    from trtllm.config import BuildConfig
    from trtllm.runtime.llm import LLM
    from trtllm.runtime.speculative.config import NGramDecodingConfig
    from trtllm.sampling_params import SamplingParams

    def speculative_llm(**options):
        return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
                   build_config=BuildConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=64),
                   speculative_config=NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2, **options))

    path = checkpoint("deepseek_v3", tmp_path_factory)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], PROMPTS[2]]
    hf = hf_model(path)
    expected = [hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(p):]
                .tolist() for p in prompts]
    with speculative_llm() as engine:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        stats = vars(engine.engine_stats())
    assert got == expected
    assert stats["spec_verify_steps"] > 0 and stats["spec_accepted_tokens"] > 0, stats


def test_fp8_linears_with_mla_keep_kv_b_proj_and_an_fp8_kv_b_proj_is_refused(tmp_path_factory):
    """QuantConfig FP8 quantizes every linear but kv_b_proj, which the MLA op reads in the
    model dtype; a description that quantizes it anyway is refused naming it, rather than run
    with the NaN placeholder weight."""
    import trtllm
    from tests.models.checkpoints import random_batch
    from trtllm.compile import CompileError
    from trtllm.config import BuildConfig, QuantAlgo, QuantConfig
    from trtllm.models.hf import load_hf_module
    from trtllm.quantization.fp8_linears import Fp8Linears, quantize_weight
    from trtllm.runtime.llm import LLM
    from trtllm.sampling_params import SamplingParams
    path = checkpoint("deepseek_v2", tmp_path_factory)
    with LLM(str(path), dtype="bfloat16", quant_config=QuantConfig(quant_algo="FP8"),
             build_config=BuildConfig(max_batch_size=2, max_num_tokens=16, max_seq_len=64)) as engine:
        out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                              use_tqdm=False)
        summary = engine.compiled.summary()
    assert out[0].outputs[0].finish_reason == "length"
    assert "trtllm.fp8_gemm" in summary and "trtllm.mla_attention" in summary, summary
    model = load_hf_module(path, torch.bfloat16, torch.device("cpu"))
    fp8 = Fp8Linears(source="by hand")
    kv_b = model.model.layers[0].self_attn.kv_b_proj
    fp8.linears["model.layers.0.self_attn.kv_b_proj"] = quantize_weight(kv_b.weight, QuantAlgo.FP8)
    fp8.attach(model)
    with pytest.raises(CompileError, match="an FP8-quantized kv_b_proj with multi-head latent attention"):
        trtllm.compile(model)(random_batch(batch=1, seq_len=3), torch.arange(3)[None])
