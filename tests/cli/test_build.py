"""trtllm-build (trtllm/cli/build.py): a tiny fp32 checkpoint written here is quantized and
saved; LLM(model=OUT) loads the result with no QuantConfig and its greedy tokens are those of
LLM(model=DIR, quant_config=QuantConfig(quant_algo=same)); KV scales are calibrated, written
and used; the limits given become LLM's defaults; bad input exits 2 naming it."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.cli.build import main
from trtllm.config import BuildConfig, KvCacheConfig, QuantConfig
from trtllm.kernels.fp8_gemm import FP8_DTYPE
from trtllm.quantization import fp8_linears_of
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 3], list(range(60, 81))]
NEW = 6
KV = KvCacheConfig(tokens_per_block=16, max_tokens=512)
BUILD = BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=64)


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """Whole engines: the ops' torch references (tests/kernels checks the kernels against them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    paths = {family: write_checkpoint(family, tmp_path_factory.mktemp(family), vocab_size=512)
             for family in ("qwen2", "llama31")}
    for path in paths.values():
        make_tokenizer(path)
    return paths


def _greedy(llm):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _build(src, out, *extra):
    return main(["--model_dir", str(src), "--output_dir", str(out), "--no_progress", *extra])


@pytest.mark.parametrize("family, algo, layout, scale_name", [
    ("llama31", "FP8", "compressed-tensors", "weight_scale"),
    ("qwen2", "FP8_PER_CHANNEL_PER_TOKEN", "compressed-tensors", "weight_scale"),  # tied head, q/k/v biases
    ("llama31", "FP8_BLOCK_SCALES", "fp8", "weight_scale_inv"),
])
def test_build_loads_back_and_matches_online_quantization(sources, tmp_path, family, algo, layout, scale_name):
    out = tmp_path / "out"
    assert _build(sources[family], out, "--quant_algo", algo) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == layout
    assert (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == FP8_DTYPE
        assert f"model.layers.0.mlp.down_proj.{scale_name}" in names
        assert not any(n.endswith("k_scale") for n in names)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    with LLM(str(sources[family]), dtype="float32", kv_cache_config=KV, build_config=BUILD,
             quant_config=QuantConfig(quant_algo=algo)) as llm:
        expected = _greedy(llm)
    with LLM(str(out), dtype="float32", kv_cache_config=KV, build_config=BUILD) as llm:
        assert _greedy(llm) == expected
        fp8 = fp8_linears_of(llm.compiled.module)
        assert len(fp8.linears) == 14 and layout.replace("fp8", "HF fp8") in fp8.source
        assert llm.engine.runner.kv_quant is None


@pytest.mark.parametrize("kv_algo", ["FP8", "INT8"])
def test_kv_scales_are_calibrated_written_and_used(sources, tmp_path, kv_algo):
    out = tmp_path / "out"
    assert _build(sources["llama31"], out, "--quant_algo", "FP8_PER_CHANNEL_PER_TOKEN",
                  "--kv_cache_quant_algo", kv_algo) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["type"] == ("float" if kv_algo == "FP8" else "int")
    # the reference: LLM's own calibration over the same built-in text, same weights
    with LLM(str(sources["llama31"]), dtype="float32", kv_cache_config=KV, build_config=BUILD,
             quant_config=QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN")) as llm:
        from trtllm.runtime.kv_cache_quant import CALIBRATION_TEXTS, calibrate_kv_scales
        prompts = [llm.tokenizer.encode(t) for t in CALIBRATION_TEXTS]
        expected = calibrate_kv_scales(llm.compiled, prompts, kv_algo.lower())
    with LLM(str(out), dtype="float32", kv_cache_config=KV, build_config=BUILD) as llm:  # format from the build
        quant = llm.engine.runner.kv_quant
        assert quant.source == "checkpoint" and quant.fmt == kv_algo.lower()
        torch.testing.assert_close(quant.scales, expected, rtol=1e-5, atol=0)
        assert len(_greedy(llm)[0]) == NEW
    with LLM(str(sources["llama31"]), dtype="float32", build_config=BUILD,
             kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512, dtype=kv_algo.lower()),
             quant_config=QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN"),
             kv_cache_scales=[(s[0, 0], s[1, 0]) for s in expected]) as llm:
        reference = _greedy(llm)
    with LLM(str(out), dtype="float32", kv_cache_config=KV, build_config=BUILD) as llm:
        assert _greedy(llm) == reference


def test_calibration_dataset_jsonl_sets_the_scales(sources, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Hello world, hello there.", "The quick brown "
                                                                      "fox jumps over the lazy dog."] * 3))
    lines = tmp_path / "calib.txt"
    lines.write_text("Hello world, hello there.\n\nThe quick brown fox jumps over the lazy dog.\n")
    scales = []
    for i, file in enumerate((data, lines)):
        out = tmp_path / f"out{i}"
        assert _build(sources["llama31"], out, "--quant_algo", "FP8", "--kv_cache_quant_algo", "FP8",
                      "--calib_dataset", str(file), "--calib_size", "2", "--calib_max_seq_length", "64") == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            scales.append(torch.stack([f.get_tensor(f"model.layers.{i}.self_attn.{n}_scale")
                                       for i in range(2) for n in "kv"]))
    torch.testing.assert_close(scales[0], scales[1], rtol=0, atol=0)  # same two texts either way
    assert (scales[0] > 0).all()


def test_static_activation_scales_are_calibrated_and_loaded(sources, tmp_path):
    from tests.models.checkpoints import hf_model
    from tests.quantization.fp8_checkpoints import fp8_reference
    from trtllm.kernels.fp8_gemm import FP8_MAX
    from trtllm.runtime.kv_cache_quant import CALIBRATION_TEXTS
    from trtllm.runtime.tokenizer import load_tokenizer

    src, out = sources["llama31"], tmp_path / "out"
    assert _build(src, out, "--quant_algo", "FP8", "--activation_scheme", "static") == 0
    acts = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "input_activations"]
    assert (acts["dynamic"], acts["strategy"]) == (False, "tensor")
    # the scales: amax / 448 of each linear's input in the HF model over the same (built-in) text
    hf, amax = hf_model(src), {}
    hooks = [m.register_forward_pre_hook(lambda m, a, path=path: amax.__setitem__(
        path, max(amax.get(path, 0.0), a[0].abs().max().item())))
        for path, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and path != "lm_head"]
    tokenizer = load_tokenizer(src)
    with torch.no_grad():
        for text in CALIBRATION_TEXTS:
            hf(torch.tensor([tokenizer.encode(text)]))
    for h in hooks:
        h.remove()
    with LLM(str(out), dtype="float32", kv_cache_config=KV, build_config=BUILD) as llm:
        linears = fp8_linears_of(llm.compiled.module).linears
        assert sorted(linears) == sorted(amax)
        for path, q in linears.items():
            torch.testing.assert_close(q.input_scale, torch.tensor([amax[path] / FP8_MAX]), rtol=1e-5, atol=0)
        got = _greedy(llm)
    reference = fp8_reference(src, linears)
    expected = [reference.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
                [0, len(p):].tolist() for p in PROMPTS]
    assert got == expected
    # with an FP8 KV cache too (TensorRT-LLM's FP8 recipe): KV calibrated on the static-scale model
    both = tmp_path / "both"
    assert _build(src, both, "--quant_algo", "FP8_PER_CHANNEL_PER_TOKEN", "--activation_scheme", "static",
                  "--kv_cache_quant_algo", "FP8") == 0
    with LLM(str(both), dtype="float32", kv_cache_config=KV, build_config=BUILD) as llm:
        assert llm.engine.runner.kv_quant.source == "checkpoint" and llm.engine.runner.kv_quant.fmt == "fp8"
        assert all(q.input_scale is not None for q in fp8_linears_of(llm.compiled.module).linears.values())
        assert len(_greedy(llm)[2]) == NEW


def test_build_limits_become_llm_defaults(sources, tmp_path):
    out = tmp_path / "out"
    assert _build(sources["llama31"], out, "--quant_algo", "FP8", "--max_batch_size", "3", "--max_input_len", "40",
                  "--max_seq_len", "48") == 0
    assert json.loads((out / "trtllm_build.json").read_text())["build_config"] == {
        "max_batch_size": 3, "max_input_len": 40, "max_seq_len": 48}
    with LLM(str(out), dtype="float32", kv_cache_config=KV) as llm:
        assert (llm.limits.max_num_seqs, llm.limits.max_input_len, llm.limits.max_seq_len) == (3, 40, 48)
    with LLM(str(out), dtype="float32", kv_cache_config=KV, build_config=BUILD) as llm:  # the user's wins
        assert (llm.limits.max_num_seqs, llm.limits.max_seq_len) == (4, 64)


@pytest.mark.parametrize("case, words", [
    ("missing", "--model_dir .*: no such directory"),
    ("no_config", "no config.json, not a HF checkpoint"),
    ("algo", "--quant_algo W4A16_AWQ: not supported; trtllm-build quantizes to FP8, FP8_PER_CHANNEL_PER_TOKEN"),
    ("kv_algo", "--kv_cache_quant_algo NVFP4: not supported"),
    ("not_empty", "--output_dir .*: exists and is not an empty directory"),
    ("calib_without_kv", "--calib_dataset: calibration option; .*KV-cache scales.*or static activation scales.*"
                         "it would be unused"),
    ("calib_size_without_kv", "--calib_size, --calib_max_seq_length: calibration options; .*they would be unused"),
    ("static_block", "--activation_scheme static with FP8_BLOCK_SCALES"),
    ("seq_len", "max_seq_len=1000 exceeds the model's max_position_embeddings=256"),
    ("quantized", "already quantized"),
    ("out_in_a_file", "--output_dir .*config.json/out: .*config.json is not a directory"),
    ("out_unwritable", "--output_dir /proc/out: cannot write in /proc"),
    ("config_list", "config.json: expected a JSON object, got list"),
    ("device", "--device 'gpu0': not a torch device"),
    ("calib_not_utf8", "--calib_dataset .*calib.txt: not UTF-8 text"),
])
def test_bad_input_exits_2_naming_it(sources, tmp_path, capsys, case, words):
    src, out, algo = sources["llama31"], tmp_path / "out", "FP8"
    extra = []
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "no_config":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "algo":
        algo = "W4A16_AWQ"
    elif case == "kv_algo":
        extra = ["--kv_cache_quant_algo", "NVFP4"]
    elif case == "not_empty":
        out.mkdir()
        (out / "x").write_text("")
    elif case == "calib_without_kv":
        extra = ["--calib_dataset", str(src / "config.json")]
    elif case == "calib_size_without_kv":  # non-None defaults: given alone, they were silently unused
        extra = ["--calib_size", "4", "--calib_max_seq_length", "64"]
    elif case == "static_block":
        algo, extra = "FP8_BLOCK_SCALES", ["--activation_scheme", "static"]
    elif case == "seq_len":
        extra = ["--max_seq_len", "1000"]
    elif case == "out_in_a_file":
        out = src / "config.json" / "out"
    elif case == "out_unwritable":
        out = Path("/proc/out")
    elif case == "config_list":
        src = tmp_path / "list"
        src.mkdir()
        (src / "config.json").write_text("[1, 2]")
    elif case == "device":
        extra = ["--device", "gpu0"]
    elif case == "calib_not_utf8":
        (tmp_path / "calib.txt").write_bytes(b"some text\nmore \xff\xfe text\n")
        extra = ["--kv_cache_quant_algo", "FP8", "--calib_dataset", str(tmp_path / "calib.txt")]
    elif case == "quantized":
        assert _build(src, tmp_path / "first", "--quant_algo", "FP8") == 0
        src = tmp_path / "first"
    assert _build(src, out, "--quant_algo", algo, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("trtllm-build: ") and re.search(words, err), err
    if case != "not_empty":
        assert not out.exists()  # nothing written


def test_block_scales_of_experts_off_128_rows_exit_2_before_loading(tmp_path, capsys, monkeypatch):
    """Was a ValueError traceback out of main, after loading and quantizing the whole model."""
    src = write_checkpoint("qwen3_moe", tmp_path / "moe")  # experts 32 rows wide
    import trtllm.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    assert _build(src, tmp_path / "out", "--quant_algo", "FP8_BLOCK_SCALES") == 2
    assert re.search(r"FP8_BLOCK_SCALES experts 32 rows wide \(not a multiple of 128\) cannot be written",
                     capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
