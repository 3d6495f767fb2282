"""--model NAME_OR_DIR: the demo, a checkpoint directory, a preset at real shapes; refusals."""
import pytest
import torch

from tests.models.checkpoints import write_checkpoint
from trtllm.cli.model_arg import PRESETS, UnknownModel, build_preset, resolve_model
from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
from trtllm.models.loader import ARCHITECTURES


def test_demo_directory_and_preset_resolve(tmp_path):
    for name in (None, "demo"):
        demo = resolve_model(name)
        assert demo.kind == "demo" and demo.has_tokenizer and demo.vocab_size == 4096
        assert demo.llm_kwargs()["model"] == str(demo.path)
    write_checkpoint("llama31", tmp_path, vocab_size=300)
    d = resolve_model(str(tmp_path))
    assert (d.kind, d.vocab_size, d.max_position_embeddings, d.has_tokenizer) == ("directory", 300, 256, False)
    model = d.llm_kwargs(dtype="float32")["model"]  # no tokenizer: loaded here, for LLM(model=module)
    assert isinstance(model, torch.nn.Module) and model.lm_head.weight.dtype == torch.float32
    p = resolve_model("Llama-3.1-8B")
    assert (p.kind, p.vocab_size, p.max_position_embeddings, p.has_tokenizer) == ("preset", 128256, 131072, False)
    assert p.tokenizer() is None


def test_unknown_names_list_the_presets_and_missing_paths_say_so(tmp_path):
    with pytest.raises(UnknownModel) as e:
        resolve_model("llama-9")
    assert "llama-3.1-8b" in str(e.value) and "qwen3-8b" in str(e.value) and "'demo'" in str(e.value)
    with pytest.raises(UnknownModel, match="nowhere' does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(UnknownModel, match="config.json not found"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name, parameters", [("llama-3.1-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400),
                                              ("qwen3-8b", 8_190_735_360)])
def test_presets_have_the_published_models_shapes(name, parameters):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_hf(PRESETS[name]))
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.parametrize("name, parameters", [("qwen3-30b-a3b", 30_532_122_624), ("mixtral-8x7b", 46_702_792_704),
                                              ("deepseek-v2-lite", 15_706_484_224)])
def test_moe_presets_have_the_published_models_shapes(name, parameters):
    """30.5B, 46.7B and 15.7B, as Qwen, Mistral and DeepSeek publish them (transformers' modules on meta)."""
    import transformers
    config = {k: v for k, v in PRESETS[name].items() if k not in ("model_type", "torch_dtype")}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(PRESETS[name]["model_type"], **config))
    assert sum(p.numel() for p in model.parameters()) == parameters
    ours = ARCHITECTURES.get(PRESETS[name]["architectures"][0])
    if ours is not None:  # the preset builds our file: the same parameter count
        with torch.device("meta"):
            model = ours(ours.config_class.from_hf(PRESETS[name]))
        assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.parametrize("name, module", [("tiny-qwen3-moe", "trtllm.models.qwen3_moe.Qwen3MoeForCausalLM"),
                                          ("tiny-mixtral", "trtllm.models.mixtral.MixtralForCausalLM"),
                                          ("tiny-deepseek-v2", "transformers.models.deepseek_v2.modeling_deepseek_v2."
                                                               "DeepseekV2ForCausalLM")])
def test_an_moe_preset_is_our_file_or_transformers_module_seeded_and_fused_by_llm(name, module):
    from trtllm.config import BuildConfig
    from trtllm.runtime.llm import LLM
    from trtllm.sampling_params import SamplingParams

    a = build_preset(PRESETS[name], dtype="bfloat16", device="cpu", seed=1)
    assert f"{type(a).__module__}.{type(a).__name__}" == module and {p.dtype for p in a.parameters()} == {torch.bfloat16}
    b = build_preset(PRESETS[name], dtype="bfloat16", device="cpu", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    experts = next(m for m in a.modules() if hasattr(m, "gate_up_proj")).gate_up_proj  # DeepSeek: layer 0 dense
    assert abs(experts.float().std().item() - experts.shape[-1] ** -0.5) < 0.02  # fan-in scaled, not HF's init
    spec = resolve_model(name)
    with LLM(**spec.llm_kwargs(dtype="float32", device="cpu"),
             build_config=BuildConfig(max_batch_size=2, max_num_tokens=16, max_seq_len=32)) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
        summary = llm.compiled.summary()
    assert len(out[0].outputs[0].token_ids) == 3
    assert "trtllm.fused_moe" in summary and "left as captured" not in summary, summary


def test_a_preset_is_built_in_its_dtype_tied_seeded_and_runs():
    config = dict(PRESETS["tiny-llama"], tie_word_embeddings=True)
    a = build_preset(config, dtype="bfloat16", device="cpu", seed=1)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    assert a.lm_head.weight is a.model.embed_tokens.weight
    b = build_preset(config, dtype="bfloat16", device="cpu", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = build_preset(PRESETS["tiny-qwen3"], device="cpu")
    assert c.lm_head.weight.dtype == torch.float32  # "auto": the preset's torch_dtype
    ids = torch.tensor([[1, 2, 3]])
    logits = c(ids, torch.arange(3)[None])
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_preset(config, dtype="int8", device="cpu")
