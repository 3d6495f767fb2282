"""LLM(model=path) for HF decoder families beyond Llama: our model file where there is one
(Gemma, Gemma-2, Gemma-3 text, Phi-3), else transformers' module under trtllm's attention
interface (models/hf.py), compiled by the same passes. Greedy output equals HF generate
token for token (fp32, chunked prefill and prefix reuse on, windows that bite; ALiBi through our
BLOOM and MPT files; no-rope layers of SmolLM3, Cohere2 and Llama-4 through HF's modules); a
family the kernels or the contract cannot run is refused by name."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.compile import CompileError
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.models.hf import load_hf_module
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 3], list(range(60, 81)), [9]]
NEW = 8
RUN = ["phi", "gpt2", "gpt_neox", "stablelm", "starcoder2", "olmo2", "granite", "cohere",
       "smollm3", "cohere2", "llama4_full"]  # the last three with no-rope layers
MOE = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 1, "olmoe": 2}  # family -> MoE layers (of 2)
OWN_FILE = {"gemma": "gemma.GemmaForCausalLM", "gemma2": "gemma.GemmaForCausalLM", "gemma3": "gemma.GemmaForCausalLM",
            "gemma2_softcap": "gemma.GemmaForCausalLM", "phi3": "phi3.Phi3ForCausalLM", "phi3_partial": "phi3.Phi3ForCausalLM",
            "bloom": "bloom.BloomForCausalLM", "bloom_post_ln": "bloom.BloomForCausalLM",
            "mpt": "mpt.MptForCausalLM", "mpt_clip": "mpt.MptForCausalLM",
            "falcon": "falcon.FalconForCausalLM", "falcon_7b": "falcon.FalconForCausalLM",
            "qwen3_moe": "qwen3_moe.Qwen3MoeForCausalLM", "mixtral": "mixtral.MixtralForCausalLM",
            "qwen2_moe": "qwen2_moe.Qwen2MoeForCausalLM", "olmoe": "olmoe.OlmoeForCausalLM"}


def checkpoint(family, tmp_path_factory):
    path = tmp_path_factory.mktemp(family)
    write_checkpoint(family, path, vocab_size=512)
    make_tokenizer(path)
    return path


def llm(model, tokenizer=None, **build):
    # max_num_tokens 8: the 21-token prompt is prefilled in chunks; block reuse is on by default
    model = model if isinstance(model, torch.nn.Module) else str(model)
    return LLM(model, tokenizer, dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
               build_config=BuildConfig(**{"max_batch_size": 4, "max_num_tokens": 8, "max_seq_len": 64, **build}))


def hf_greedy(path, attn_implementation="eager") -> tuple[list[list[int]], str]:
    """HF generate's greedy tokens for PROMPTS, and the HF model's class name."""
    model = hf_model(path) if attn_implementation == "eager" else AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation).eval()
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            [0, len(p):].tolist() for p in PROMPTS], type(model).__name__


def check_greedy(engine, expected):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    for _ in range(2):  # the second run takes the prompts' full blocks from the prefix cache
        got = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]
        assert got == expected
    assert engine.block_manager.prefix_hit_rate > 0


@pytest.mark.parametrize("family", RUN)
def test_greedy_matches_hf_generate(family, tmp_path_factory):
    path = checkpoint(family, tmp_path_factory)
    expected, hf_class = hf_greedy(path)
    with llm(path) as engine:
        summary = engine.compiled.summary()
        assert f"HF module {hf_class}" in summary, summary
        check_greedy(engine, expected)


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_greedy_matches_hf_generate_with_the_blocks_fused(family, tmp_path_factory):
    """MoE families under fuse_moe (HF's modules; Qwen3-MoE our file, models/qwen3_moe.py): every
    block (in every compiled graph) becomes moe_routing + fused_moe, and the tokens are HF's."""
    path = checkpoint(family, tmp_path_factory)
    expected, hf_class = hf_greedy(path)
    with llm(path) as engine:
        check_greedy(engine, expected)
        summary = engine.compiled.summary()
        graphs = engine.compiled.captures
    assert (f"model file of ours: trtllm.models.{OWN_FILE[family]}" if family in OWN_FILE
            else f"HF module {hf_class}") in summary, summary
    assert f"trtllm.fused_moe: {MOE[family] * graphs}" in summary, summary
    assert f"trtllm.moe_routing: {MOE[family] * graphs}" in summary, summary
    assert "left as captured" not in summary, summary


@pytest.mark.parametrize("algo", ["FP8", "FP8_BLOCK_SCALES"])
def test_an_fp8_moe_checkpoint_has_fp8_linears_and_fp8_experts(algo, tmp_path_factory):
    """QuantConfig FP8 with an MoE family: the attention and dense-MLP linears become FP8 GEMMs,
    the experts FP8 too: each MoE block becomes moe_routing + fused_moe_fp8 (no bf16 fused_moe)."""
    from trtllm.config import QuantConfig
    path = checkpoint("qwen3_moe", tmp_path_factory)
    build = BuildConfig(max_batch_size=2, max_num_tokens=16, max_seq_len=64)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with LLM(str(path), dtype="bfloat16", quant_config=QuantConfig(quant_algo=algo), build_config=build) as engine:
        out = engine.generate([[5, 6, 7, 8]], params, use_tqdm=False)
        summary, graphs = engine.compiled.summary(), engine.compiled.captures
    assert out[0].outputs[0].finish_reason == "length"
    assert f"trtllm.fused_moe_fp8: {MOE['qwen3_moe'] * graphs}" in summary and "trtllm.fp8_gemm" in summary, summary
    assert "trtllm.fused_moe:" not in summary and "FP8 experts of 1 MoE blocks" in summary, summary
    assert "left as captured" not in summary, summary


def test_an_hf_moe_module_with_eager_experts_is_served_fused(tmp_path_factory):
    """HF's eager experts (a loop over nonzero hits, no single graph) are switched to batched_mm,
    which fuse_moe replaces like the default grouped_mm."""
    path = checkpoint("qwen3_moe", tmp_path_factory)
    expected, _ = hf_greedy(path)
    module = load_hf_module(path, torch.float32, torch.device("cpu"))
    module.set_experts_implementation("eager")
    with llm(module, tokenizer=str(path)) as engine:
        check_greedy(engine, expected)
        summary = engine.compiled.summary()
    assert "trtllm.fused_moe" in summary and "left as captured" not in summary, summary


@pytest.mark.parametrize("family", sorted(OWN_FILE))
def test_greedy_of_our_model_file_matches_hf_generate(family, tmp_path_factory):
    path = checkpoint(family, tmp_path_factory)
    expected, _ = hf_greedy(path)
    with llm(path) as engine:
        summary = engine.compiled.summary()
        assert f"model file of ours: trtllm.models.{OWN_FILE[family]}" in summary, summary
        check_greedy(engine, expected)
        if family == "gemma3":  # QK-norm: q's and k's norm joined with their rope, in every graph
            summary = engine.compiled.summary()
            assert f"trtllm.rms_norm_rotary: {4 * engine.compiled.captures}" in summary, summary
            assert "trtllm.rotary:" not in summary, summary


@pytest.mark.parametrize("family, hf_class", [("gemma", "GemmaForCausalLM"),
                                              ("gemma2_softcap", "Gemma2ForCausalLM")])
def test_the_hf_module_path_still_runs_a_family_we_have_a_file_for(family, hf_class, tmp_path_factory):
    """Passing the HF module itself takes the HF-module path (what LLM(model=path) did before
    models/gemma.py): it still gives HF's tokens, attention soft-capping included."""
    path = checkpoint(family, tmp_path_factory)
    expected, _ = hf_greedy(path)
    module = load_hf_module(path, torch.float32, torch.device("cpu"))
    with llm(module, tokenizer=str(path)) as engine:
        assert f"HF module {hf_class}" in engine.compiled.summary()
        check_greedy(engine, expected)


@pytest.mark.parametrize("family, error, why", [
    ("gptj", CompileError, "GPTJForCausalLM is refused: its attention does not go through HF's AttentionInterface"),
    ("gpt_oss", CompileError, r"attention layer 0 \(GptOssAttention\): the attention argument 's_aux'"),
    ("llama4", CompileError, r"attention layers \[0\] \(Llama4TextAttention\): chunked attention "
                             r"\(attention_chunk_size=8"),
])
def test_a_family_that_cannot_run_is_refused_by_name(family, error, why, tmp_path_factory):
    path = checkpoint(family, tmp_path_factory)
    with pytest.raises(error, match=why):
        llm(path)


def test_gemma2_soft_capping_changes_hf_greedy_tokens(tmp_path_factory):
    """The gemma2_softcap checkpoint's cap (5) changes HF's own greedy tokens for these
    prompts, so the greedy tests of gemma2_softcap fail if the cap is dropped."""
    path = checkpoint("gemma2_softcap", tmp_path_factory)
    capped, uncapped = hf_model(path), hf_model(path)
    uncapped.config.attn_logit_softcapping = None
    assert capped.config.attn_logit_softcapping == 5.0
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None

    def greedy(model):
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
                [0, len(p):].tolist() for p in PROMPTS]

    assert greedy(capped) != greedy(uncapped)


def test_our_model_file_is_taken_where_there_is_one(tmp_path_factory):
    with llm(checkpoint("qwen2_swa", tmp_path_factory)) as engine:
        summary = engine.compiled.summary()
    assert "model file of ours: trtllm.models.llama.LlamaForCausalLM" in summary
    assert "sliding windows per layer [0, 4]" in summary


@pytest.mark.parametrize("family, attn", [("bloom", "eager"), ("mpt", "eager"), ("falcon_alibi", "sdpa")])
def test_alibi_is_applied_by_the_paged_kernels_and_bites(family, attn, tmp_path_factory):
    """The summary names the slopes the paged kernels add, and without them (our eager model,
    slopes zeroed) the greedy tokens are not HF's: the ALiBi greedy tests above can fail."""
    from trtllm.models.loader import load_model
    path = checkpoint(family, tmp_path_factory)
    expected, _ = hf_greedy(path, attn)
    with llm(path) as engine:
        summary = engine.compiled.summary()
    assert "ALiBi slopes per head [" in summary, summary
    model = load_model(path, dtype=torch.float32, device="cpu")
    model.transformer.alibi_slopes.zero_()

    def greedy(prompt):
        ids = list(prompt)
        for _ in range(NEW):
            with torch.no_grad():
                logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])
            ids.append(int(logits[0, -1].argmax()))
        return ids[len(prompt):]

    assert [greedy(p) for p in PROMPTS] != expected


def test_falcon_alibi_greedy_matches_hf_generate_with_sdpa(tmp_path_factory):
    """Falcon-RW's layout (ALiBi) through models/falcon.py equals HF generate with HF's default
    attention (sdpa), which adds the bias once, as Falcon's own code does. HF's eager Falcon adds
    it twice (in the mask it builds and again in the attention): not the reference."""
    path = checkpoint("falcon_alibi", tmp_path_factory)
    expected, _ = hf_greedy(path, "sdpa")
    with llm(path) as engine:
        summary = engine.compiled.summary()
        assert "model file of ours: trtllm.models.falcon.FalconForCausalLM" in summary, summary
        check_greedy(engine, expected)
        summary = engine.compiled.summary()
    assert "ALiBi slopes per head [" in summary and "trtllm.rotary" not in summary, summary


@pytest.mark.parametrize("family, why", [
    ("falcon_alibi", r"FalconForCausalLM is refused: its attention \(and ALiBi, which only our BLOOM, MPT and "
                     r"Falcon model files give the kernels\) does not go through"),
    ("falcon", "FalconForCausalLM is refused: its attention does not go through"),
])
def test_hf_falcon_modules_are_refused_by_name(family, why, tmp_path_factory):
    """HF's own Falcon module (passed as a module; by path our file runs) pages nothing: its
    attention does not go through the interface, and its ALiBi is named."""
    path = checkpoint(family, tmp_path_factory)
    with pytest.raises(CompileError, match=why):
        llm(load_hf_module(path, torch.float32, torch.device("cpu")), tokenizer=str(path))
