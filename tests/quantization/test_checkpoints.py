"""Pre-quantized FP8 checkpoints (trtllm/quantization/checkpoint.py), each layout written by
the test itself: LLM(model=path) loads it with no QuantConfig, places the FP8 GEMMs, and its
greedy tokens and logits are those of the HF model computing the FP8 semantics in fp32
(dequantized weights, quantized-and-dequantized inputs); bad checkpoints are refused naming
the tensor or the field."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import trtllm
from tests.models.checkpoints import write_checkpoint
from tests.quantization.fp8_checkpoints import fp8_reference, write_fp8_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, KvCacheConfig, QuantConfig
from trtllm.kernels.fp8_gemm import FP8_DTYPE
from trtllm.quantization import fp8_linears_of
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 3], list(range(60, 81))]
NEW = 6

CASES = [  # (family, layout, weight granularity, static input scales)
    ("qwen2", "hf_fp8", "block", False),          # Qwen3-FP8 / DeepSeek-V3 style; q/k/v biases, tied head
    ("llama31", "hf_fp8", "tensor", False),
    ("llama31", "compressed_tensors", "channel", False),
    ("qwen2", "compressed_tensors", "tensor", True),
    ("llama31", "modelopt", "tensor", True),      # TensorRT-LLM's FP8
    ("llama31", "modelopt", "channel", False),    # FP8_PER_CHANNEL_PER_TOKEN
]


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """Whole engines: the ops' torch references (tests/kernels checks the kernels against them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    paths = {family: write_checkpoint(family, tmp_path_factory.mktemp(family), vocab_size=512)
             for family in ("qwen2", "llama31")}
    for path in paths.values():
        make_tokenizer(path)  # copied beside the FP8 checkpoints
    return paths


def _llm(path):
    return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512),
               build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=64))


@pytest.mark.parametrize("family, layout, granularity, static", CASES)
def test_llm_loads_the_layout_and_matches_the_fp8_reference(sources, tmp_path, family, layout, granularity, static):
    linears = write_fp8_checkpoint(sources[family], tmp_path, layout, granularity, static)
    reference = fp8_reference(sources[family], linears)
    expected = [reference.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
                [0, len(p):].tolist() for p in PROMPTS]
    with _llm(tmp_path) as llm:
        params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert got == expected
        summary = llm.compiled.summary()
        assert f"{len(linears)} FP8 linears" in summary and "fp8_gemm" in summary, summary
        assert "trtllm.linear" not in summary.split("trtllm ops")[1].split("lm head")[0]
        fp8 = fp8_linears_of(llm.compiled.module)
        for path, q in fp8.linears.items():  # the model holds no full-size weight of its own for them
            assert q.weight.dtype == FP8_DTYPE
            assert llm.compiled.module.get_submodule(path).weight.stride() == (0, 0)
        if layout == "modelopt":  # KV scales read and handed on, not applied here
            assert sorted(fp8.kv_scales)[:2] == ["model.layers.0.self_attn.k_proj.k_scale",
                                                 "model.layers.0.self_attn.v_proj.v_scale"]
    # logits of whole sequences, against the reference's
    model = trtllm.load_model(tmp_path, dtype=torch.float32, device="cpu")
    ids = torch.tensor([PROMPTS[2]])
    logits = trtllm.compile(model)(ids, torch.arange(ids.shape[1])[None])
    with torch.no_grad():
        ref = reference(ids).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def _rewrite(path, drop=(), replace=None, config=None):
    tensors = load_file(str(path / "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        c = json.loads((path / "config.json").read_text())
        c["quantization_config"] = config
        (path / "config.json").write_text(json.dumps(c))


def test_a_missing_scale_is_named(sources, tmp_path):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "hf_fp8", "block", False)
    name = "model.layers.1.mlp.down_proj.weight_scale_inv"
    _rewrite(tmp_path, drop=[name])
    with pytest.raises(ValueError, match=f"'{name}' is missing"):
        trtllm.load_model(tmp_path, device="cpu")


def test_a_misshaped_scale_is_named(sources, tmp_path):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "compressed_tensors", "channel", False)
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    _rewrite(tmp_path, replace={name: torch.ones(2, 3)})
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(2, 3\)"):
        trtllm.load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("scale, words", [
    (torch.tensor([0.0]), r"must hold finite positive scales; it holds \[0\.0\]"),
    (torch.tensor([float("nan")]), r"must hold finite positive scales; it holds \[nan\]"),
    (torch.tensor([1], dtype=torch.int32), r"is torch\.int32: scales are floating point"),  # said 'finite positive'
])
def test_a_scale_that_is_no_scale_says_what_it_holds(sources, tmp_path, scale, words):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "compressed_tensors", "tensor", False)
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    _rewrite(tmp_path, replace={name: scale})
    with pytest.raises(ValueError, match=rf"'{name}' {words}"):
        trtllm.load_model(tmp_path, device="cpu")


def test_a_missing_static_input_scale_is_named(sources, tmp_path):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "modelopt", "tensor", True)
    name = "model.layers.0.mlp.up_proj.input_scale"
    _rewrite(tmp_path, drop=[name])
    with pytest.raises(ValueError, match=f"'{name}' is missing.*static input scale"):
        trtllm.load_model(tmp_path, device="cpu")


# a compressed-tensors FP8 config trtllm loads: per-channel weights, dynamic per-token activations
CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
    "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                       "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}}}}


@pytest.mark.parametrize("config, words", [
    ({"quant_method": "awq", "bits": 4}, "quant_method='awq' is not supported.*compressed-tensors.*modelopt"),
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, r"weight_block_size=\[64, 64\]"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}, "input_activations": None}}},
     "weight-only FP8 is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group"}, "input_activations": None}}},
     "only FP8 weights"),
    # dynamic per-group activations the GEMMs would run per token (channel weights) or per 1x128 (group 64)
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "group",
                              "group_size": 128}}}}, r"dynamic groups of 128 with 'channel' weights"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
        "input_activations": {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "group",
                              "group_size": 64}}}}, r"dynamic groups of 64 with 'block' weights are not supported"),
    # compressed-tensors fields that were not read: packed or sparse weights, zero points, run-time weights
    ({**CT_FP8, "format": "pack-quantized"}, r"quantization_config\.format='pack-quantized' is not supported"),
    ({**CT_FP8, "config_groups": {"g": {**CT_FP8["config_groups"]["g"], "format": "int-quantized"}}},
     r"config_groups\.g\.format='int-quantized' is not supported"),
    ({**CT_FP8, "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}},
     r"sparsity_config\.format='sparse-24-bitmask': sparse \(compressed\) weights are not supported"),
    ({**CT_FP8, "config_groups": {"g": {**CT_FP8["config_groups"]["g"], "weights": {
        **CT_FP8["config_groups"]["g"]["weights"], "symmetric": False}}}}, r"weights\.symmetric=false: asymmetric"),
    ({**CT_FP8, "config_groups": {"g": {**CT_FP8["config_groups"]["g"], "input_activations": {
        **CT_FP8["config_groups"]["g"]["input_activations"], "symmetric": False}}}},
     r"input_activations\.symmetric=false: asymmetric"),
    ({**CT_FP8, "config_groups": {"g": {**CT_FP8["config_groups"]["g"], "weights": {
        **CT_FP8["config_groups"]["g"]["weights"], "dynamic": True}}}}, r"weights\.dynamic=True: weights quantized at run"),
])
def test_unsupported_quantization_configs_are_refused_by_name(sources, tmp_path, config, words):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "hf_fp8", "tensor", False)
    _rewrite(tmp_path, config=config)
    with pytest.raises(ValueError, match=words):
        trtllm.load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("modelopt, config, words", [
    ('{"quantization": {"quant_algo": "FP8",}}', None, r"hf_quant_config\.json: not valid JSON \(.* line 1"),
    ("[1]", None, r"hf_quant_config\.json: expected a JSON object, got list"),
    ('{"quantization": "FP8"}', None, r"hf_quant_config\.json: quantization is str \('FP8'\), expected an object"),
    (None, {"quant_method": "compressed-tensors", "config_groups": [1]}, r"config_groups is list \(\[1\]\)"),
    (None, {"quant_method": "compressed-tensors", "config_groups": {"g": "fp8"}},
     r"config_groups\.g is str, expected an object"),
    # a stale hf_quant_config.json beside another layout's quantization_config: it won, silently
    ('{"quantization": {"quant_algo": "FP8"}}', {"quant_method": "fp8"},
     r"hf_quant_config\.json \(ModelOpt\) and config\.json's quantization_config \(quant_method='fp8'\) both"),
])
def test_quantization_configs_of_the_wrong_shape_are_named(sources, tmp_path, modelopt, config, words):
    """Each was a raw JSONDecodeError or an AttributeError ('list' object has no attribute 'get')."""
    write_fp8_checkpoint(sources["llama31"], tmp_path, "hf_fp8" if modelopt is None else "modelopt", "channel", False)
    _rewrite(tmp_path, config=config)
    if modelopt is not None:
        (tmp_path / "hf_quant_config.json").write_text(modelopt)
    with pytest.raises(ValueError, match=words):
        trtllm.load_model(tmp_path, device="cpu")


def test_static_input_scales_under_a_dynamic_config_are_refused(sources, tmp_path):
    """The scales were calibrated, the config says dynamic: they would be ignored (the message said
    'scales with no FP8 weight beside them', next to their FP8 weights)."""
    write_fp8_checkpoint(sources["llama31"], tmp_path, "hf_fp8", "tensor", True)
    _rewrite(tmp_path, config={"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(ValueError, match=r"'model\.layers\.\d\.[\w.]+\.input_scale' is a static input scale, but "
                                         r"the config names HF fp8 checkpoint .*dynamic activations\): the scale "
                                         r"would be ignored"):
        trtllm.load_model(tmp_path, device="cpu")


def test_scales_without_a_quantization_config_are_said_to_be_scales(sources, tmp_path):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "modelopt", "channel", False)
    (tmp_path / "hf_quant_config.json").unlink()
    with pytest.raises(ValueError, match=r"tensors the model does not use: quantization scales, but config\.json has "
                                         r"no quantization_config and there is no hf_quant_config\.json"):
        trtllm.load_model(tmp_path, device="cpu")


def test_other_low_precision_weights_are_refused_by_name(sources, tmp_path):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "hf_fp8", "tensor", False)
    name = "model.layers.0.mlp.gate_proj.weight"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    _rewrite(tmp_path, replace={name: tensors[name].float().to(torch.float8_e5m2)})
    with pytest.raises(ValueError, match=f"{name}.*float8_e5m2"):
        trtllm.load_model(tmp_path, device="cpu")


def test_an_fp8_weight_holding_nan_is_refused_by_name(sources, tmp_path):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "compressed_tensors", "channel", False)
    name = "model.layers.0.self_attn.o_proj.weight"
    weight = load_file(str(tmp_path / "model.safetensors"))[name]
    weight.view(torch.uint8).view(-1)[5] = 0xFF  # e4m3fn's NaN (it has no infinity)
    _rewrite(tmp_path, replace={name: weight})
    with pytest.raises(ValueError, match=rf"tensor '{name}' holds 1 NaN or infinite value"):
        trtllm.load_model(tmp_path, device="cpu")


def test_quant_config_on_a_prequantized_checkpoint_is_refused(sources, tmp_path):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "hf_fp8", "tensor", False)
    with pytest.raises(ValueError, match="pre-quantized HF fp8 checkpoint.*leave quant_algo unset"):
        LLM(str(tmp_path), quant_config=QuantConfig(quant_algo="FP8_BLOCK_SCALES"))


def test_fp8_tensors_without_a_quantization_config_are_refused(sources, tmp_path):
    write_fp8_checkpoint(sources["llama31"], tmp_path, "hf_fp8", "tensor", False)
    _rewrite(tmp_path, drop=[n for n in load_file(str(tmp_path / "model.safetensors")) if n.endswith("_scale_inv")])
    c = json.loads((tmp_path / "config.json").read_text())
    del c["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="float8_e4m3fn but the checkpoint names no quantization"):
        trtllm.load_model(tmp_path, device="cpu")


def test_a_quantization_config_over_unquantized_weights_is_said(sources, tmp_path):
    # config.json names FP8, every weight is bf16 and no scale is stored: the model is right, but not
    # what the config says it is, so the load warns
    write_fp8_checkpoint(sources["llama31"], tmp_path, "hf_fp8", "block", False)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    _rewrite(tmp_path, drop=[n for n in tensors if n.endswith("_scale_inv")],
             replace={n: t.to(torch.bfloat16) for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn})
    with pytest.warns(UserWarning, match="names HF fp8.*but no weight of the checkpoint is FP8: it runs unquantized"):
        trtllm.load_model(tmp_path, device="cpu")


def test_modelopt_kv_scales_feed_an_fp8_kv_cache_and_only_that(sources, tmp_path):
    """ModelOpt's k_scale / v_scale (kv_cache_quant_algo FP8) become the FP8 cache's scales;
    an INT8 cache does not take FP8-calibrated scales (a warning), the bf16 cache none."""
    write_fp8_checkpoint(sources["llama31"], tmp_path, "modelopt", "tensor", True)
    kv = dict(tokens_per_block=16, max_tokens=512)
    build = BuildConfig(max_batch_size=2, max_num_tokens=16, max_seq_len=64)
    with LLM(str(tmp_path), dtype="float32", kv_cache_config=KvCacheConfig(dtype="fp8", **kv),
             build_config=build) as llm:
        quant = llm.engine.runner.kv_quant
        assert quant.fmt == "fp8" and quant.source == "checkpoint"
        assert (quant.scales[:, 0] == 0.5).all() and (quant.scales[:, 1] == 0.25).all()
        out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    with pytest.warns(UserWarning, match="KV-cache scales are for a fp8 cache, not the int8 cache"):
        with LLM(str(tmp_path), dtype="float32", kv_cache_config=KvCacheConfig(dtype="int8", **kv),
                 build_config=build) as llm:
            assert llm.engine.runner.kv_quant.source == "calibration"
    with LLM(str(tmp_path), dtype="float32", kv_cache_config=KvCacheConfig(**kv), build_config=build) as llm:
        assert llm.engine.runner.kv_quant is None


def test_static_input_scales_leave_no_work_for_inductor(sources, tmp_path):
    """A ModelOpt FP8 checkpoint (static input scales) compiles to our ops alone: its
    quantizations are trtllm.quantize_fp8_static, so a CUDA compile does not send the graph to
    Inductor for them (trtllm/inductor_choice.py: Inductor's cold start)."""
    from trtllm.inductor_choice import inductor_work, worth_inductor

    write_fp8_checkpoint(sources["llama31"], tmp_path, "modelopt", "tensor", True)
    compiled = trtllm.compile(trtllm.load_model(tmp_path, dtype=torch.float32, device="cpu"))
    compiled(torch.tensor([[5, 17, 99]]), torch.arange(3)[None])
    work = inductor_work(compiled.graphs[0].graph)
    assert not worth_inductor(work, num_layers=2), work


@pytest.mark.parametrize("layout, granularity, static", [("modelopt", "channel", False), ("modelopt", "tensor", True)])
def test_loads_in_a_dtype_other_than_its_configs(sources, tmp_path, layout, granularity, static):
    """The checkpoint is fp32 (config.json says so); loaded as bf16, the FP8 layers' placeholders
    are bf16 too (they were config.json's dtype, and the first linear failed on the dtype)."""
    write_fp8_checkpoint(sources["llama31"], tmp_path, layout, granularity, static)
    model = trtllm.load_model(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert {q.placeholder.dtype for q in fp8_linears_of(model).linears.values()} == {torch.bfloat16}
    logits = trtllm.compile(model)(torch.tensor([[5, 17, 99]]), torch.arange(3)[None])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_two_kv_scales_for_one_layer_are_refused():
    """ModelOpt's and compressed-tensors' names for one layer's k_scale, or a vision tower's layers.0:
    the scale read last was used, silently."""
    from trtllm.quantization.checkpoint import kv_cache_scales_by_layer
    from trtllm.quantization.fp8_linears import Fp8Linears
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.5), "model.layers.0.self_attn.v_scale": torch.tensor(0.5),
              "model.vision_tower.encoder.layers.0.self_attn.k_scale": torch.tensor(0.1)}
    with pytest.raises(ValueError, match=r"KV-cache scales 'model\.layers\.0\.self_attn\.k_scale' and "
                                         r"'model\.vision_tower\.encoder\.layers\.0\.self_attn\.k_scale' both give "
                                         r"layer 0's k_scale"):
        kv_cache_scales_by_layer(Fp8Linears(kv_scales=scales, kv_cache_format="fp8"), "fp8")


def test_kv_scales_read_alone_come_from_the_checkpoints_own_files(sources, tmp_path):
    """What a parallel engine's ranks read before loading (checkpoint_kv_cache_scales): the
    scales of the checkpoint's files only; a stray *.safetensors beside them (an old export, a
    vision tower's file) gave another layer 0 its scales, or a 'both give' refusal."""
    from safetensors.torch import save_file

    from trtllm.quantization.checkpoint import checkpoint_kv_cache_scales
    write_fp8_checkpoint(sources["llama31"], tmp_path, "modelopt", "tensor", True)
    save_file({"model.layers.0.self_attn.k_proj.k_scale": torch.tensor(9.0)}, tmp_path / "stray.safetensors")
    scales = checkpoint_kv_cache_scales(tmp_path, "fp8")
    assert [float(k) for k, _ in scales] == [0.5] * len(scales)


@pytest.mark.parametrize("drop, words", [
    ("model.layers.1.self_attn.k_proj.k_scale", r"KV-cache scales: layers 1 have no k_scale \(it has k_scales for "
                                                r"layers 0 of 2\)"),
    ("model.layers.0.self_attn.v_proj.v_scale", r"KV-cache scales: layers 0 have no v_scale \(it has v_scales for "
                                                r"layers 1 of 2\)"),
])
def test_kv_scales_missing_for_a_layer_name_the_checkpoint_and_the_layers(sources, tmp_path, drop, words):
    """The last layer's scale left out was "KV cache scales: 1 (k_scale, v_scale) pairs for 2 layers",
    naming neither the checkpoint nor the layer."""
    from trtllm.quantization.checkpoint import checkpoint_kv_cache_scales
    write_fp8_checkpoint(sources["llama31"], tmp_path, "modelopt", "tensor", True)
    _rewrite(tmp_path, drop=[drop])
    with pytest.raises(ValueError, match=rf"^ModelOpt checkpoint \(.*\): {words}"):
        LLM(str(tmp_path), dtype="float32", kv_cache_config=KvCacheConfig(dtype="fp8", tokens_per_block=16,
                                                                          max_tokens=512),
            build_config=BuildConfig(max_batch_size=2, max_num_tokens=16, max_seq_len=64))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: {words}"):  # read alone (parallel ranks)
        checkpoint_kv_cache_scales(tmp_path, "fp8")


def test_kv_scales_of_layers_past_the_models_are_refused_naming_them():
    from trtllm.quantization.checkpoint import kv_cache_scales_by_layer
    from trtllm.quantization.fp8_linears import Fp8Linears
    scales = {f"model.layers.{i}.self_attn.{k}": torch.tensor(0.5) for i in range(3) for k in ("k_scale", "v_scale")}
    with pytest.raises(ValueError, match=r"^ckpt: KV-cache scales for layers 0-2, but the model has 2 layers \(0-1\)"):
        kv_cache_scales_by_layer(Fp8Linears(kv_scales=scales, kv_cache_format="fp8"), "fp8", 2, "ckpt")
