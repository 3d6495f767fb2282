"""trtllm-bench end to end on CPU: the flat form, prepare-dataset, throughput and latency on
the demo model, a tiny checkpoint directory and tiny presets; the JSON report's fields;
bad input refused with one line and exit code 2 before anything runs."""
import json

import pytest

from tests.models.checkpoints import write_checkpoint
from trtllm.cli.bench import main

LATENCY_KEYS = {"mean", "p50", "p90", "p99", "min", "max"}
RESULT_KEYS = {"num_requests", "num_failed", "duration_s", "total_input_tokens", "total_output_tokens",
               "request_throughput_req_s", "output_throughput_tok_s", "total_throughput_tok_s",
               "per_user_output_throughput_tok_s", "ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms",
               "peak_gpu_memory_gib", "peak_gpu_memory_reserved_gib", "kv_pool", "max_concurrent_requests",
               "prefix_hit_rate", "num_preemptions", "engine_steps", "startup_s", "compile_after_startup_s",
               "compile_during_run_s", "first_error"}
ENVIRONMENT_KEYS = {"device", "gpu", "gpu_memory_gib", "cuda", "cpu", "hostname", "python", "torch", "triton",
                    "transformers", "trtllm", "git_commit", "git_dirty"}
OPTION_KEYS = {"model", "dtype", "seed", "max_batch_size", "max_num_tokens", "max_seq_len",
               "kv_cache_free_gpu_memory_fraction", "kv_cache_max_tokens", "kv_cache_dtype", "disable_overlap_scheduler",
               "temperature", "warmup", "report_json", "iteration_log", "profile", "profile_trace", "profile_steps"}


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # many steps: the ops' torch references


def _report(path) -> dict:
    report = json.loads(path.read_text())
    res, cfg = report["results"], report["config"]
    assert RESULT_KEYS <= set(res), RESULT_KEYS - set(res)
    assert ENVIRONMENT_KEYS <= set(cfg["environment"])
    assert OPTION_KEYS <= set(cfg["options"])
    assert set(res["startup_s"]) == {"load", "compile", "cuda_graph_capture", "other", "total"}
    assert set(res["kv_pool"]) == {"blocks", "tokens_per_block", "tokens", "dtype", "bytes", "gib"}
    assert set(res["e2e_latency_ms"]) == LATENCY_KEYS
    assert {"model", "engine", "dataset", "concurrency", "streaming", "time"} <= set(cfg)
    assert res["num_failed"] == 0 and res["first_error"] is None
    assert res["kv_pool"]["blocks"] > 0 and res["startup_s"]["total"] > 0
    assert res["peak_gpu_memory_gib"] is None  # no GPU here
    return report


@pytest.mark.filterwarnings("ignore:FP8 KV cache without k/v scales")
def test_fp8_kv_cache(tmp_path, capsys):
    """--kv_cache_dtype fp8: the report's KV pool is e4m3, half the bytes a token of the
    demo model's bf16 cache."""
    pools = {}
    for dtype in ("auto", "fp8"):
        report_file = tmp_path / f"{dtype}.json"
        assert main(["--batch_size", "2", "--input_len", "8", "--output_len", "4", "--warmup", "0",
                     "--kv_cache_max_tokens", "512", "--kv_cache_dtype", dtype, "--report_json", str(report_file)]) == 0
        pools[dtype] = _report(report_file)["results"]["kv_pool"]
    assert "(float8_e4m3fn)" in capsys.readouterr().out
    assert (pools["auto"]["dtype"], pools["fp8"]["dtype"]) == ("bfloat16", "float8_e4m3fn")
    assert pools["fp8"]["tokens"] == pools["auto"]["tokens"] and 2 * pools["fp8"]["bytes"] == pools["auto"]["bytes"]


def test_fp8_linears(tmp_path, capsys):
    """--quantization FP8_PER_CHANNEL_PER_TOKEN: the engine runs FP8 linears, and says so."""
    report_file = tmp_path / "fp8.json"
    assert main(["--batch_size", "2", "--input_len", "8", "--output_len", "4", "--warmup", "0",
                 "--quantization", "FP8_PER_CHANNEL_PER_TOKEN", "--report_json", str(report_file)]) == 0
    assert "42 FP8 linears (per-channel)" in capsys.readouterr().out
    report = _report(report_file)
    assert report["config"]["options"]["quantization"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert report["config"]["engine"]["quantization"].startswith("42 FP8 linears (per-channel)")


def test_flat_form_on_the_demo_model(tmp_path, capsys):
    report_file = tmp_path / "report.json"
    assert main(["--batch_size", "2", "--input_len", "8", "--output_len", "4", "--warmup", "1",
                 "--report_json", str(report_file)]) == 0
    out = capsys.readouterr().out
    assert "trtllm-bench flat: model demo" in out and "TTFT" in out and "output tokens/s" in out
    report = _report(report_file)
    res = report["results"]
    assert (res["num_requests"], res["total_input_tokens"], res["total_output_tokens"]) == (2, 16, 8)
    assert res["max_concurrent_requests"] == 2 and report["config"]["engine"]["max_batch_size"] == 2
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):  # the flat form streams
        assert set(res[key]) == LATENCY_KEYS
    assert res["ttft_ms"]["mean"] <= res["e2e_latency_ms"]["mean"]
    assert res["output_throughput_tok_s"] == pytest.approx(8 / res["duration_s"])


def test_speculative_ngram_reports_its_acceptance(tmp_path, capsys):
    report_file = tmp_path / "report.json"
    assert main(["--batch_size", "2", "--input_len", "8", "--output_len", "24", "--warmup", "0",
                 "--speculative", "ngram", "--max_draft_len", "3", "--report_json", str(report_file)]) == 0
    assert "speculative decoding " in capsys.readouterr().out
    report = _report(report_file)
    spec = report["results"]["speculative"]
    assert spec["verify_steps"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    assert spec["acceptance_length"] == pytest.approx(1 + spec["accepted_tokens"] / spec["verify_steps"])
    assert report["config"]["options"]["speculative"] == "ngram"


def test_speculative_eagle3_with_the_demo_models_head(tmp_path, capsys):
    from trtllm.demo import demo_model_path
    report_file = tmp_path / "report.json"
    assert main(["--batch_size", "2", "--input_len", "8", "--output_len", "16", "--warmup", "0",
                 "--speculative", "eagle3", "--speculative_model_dir", str(demo_model_path() / "eagle3"),
                 "--report_json", str(report_file)]) == 0
    report = _report(report_file)
    assert report["results"]["speculative"]["verify_steps"] > 0
    assert report["config"]["options"]["speculative"] == "eagle3"


def test_speculative_mtp_with_the_checkpoints_own_layer(tmp_path):
    from tests.runtime.test_mtp import write_target
    target, report_file = write_target(tmp_path / "v3"), tmp_path / "report.json"
    assert main(["--model", str(target), "--batch_size", "2", "--input_len", "8", "--output_len", "12",
                 "--warmup", "0", "--speculative", "mtp", "--max_draft_len", "2", "--report_json",
                 str(report_file)]) == 0
    report = _report(report_file)
    assert report["results"]["speculative"]["verify_steps"] > 0
    assert report["config"]["options"]["speculative"] == "mtp"


def test_prepare_dataset_then_throughput_on_a_tiny_checkpoint(tmp_path, capsys):
    checkpoint = write_checkpoint("llama31", tmp_path / "ckpt", vocab_size=512)
    dataset, log, report_file = tmp_path / "data.jsonl", tmp_path / "steps.jsonl", tmp_path / "report.json"
    assert main(["--model", str(checkpoint), "prepare-dataset", "--num_requests", "6", "--input_mean", "12",
                 "--input_stdev", "3", "--output_mean", "5", "--output_stdev", "1", "--output", str(dataset)]) == 0
    lines = [json.loads(line) for line in dataset.read_text().splitlines()]
    assert len(lines) == 6 and all(set(line) == {"task_id", "input_ids", "output_tokens"} for line in lines)
    assert main(["--model", str(checkpoint), "throughput", "--dataset", str(dataset), "--streaming",
                 "--concurrency", "2", "--warmup", "1", "--iteration_log", str(log),
                 "--report_json", str(report_file)]) == 0
    res = _report(report_file)["results"]
    assert res["num_requests"] == 6 and res["total_output_tokens"] == sum(line["output_tokens"] for line in lines)
    assert 1 <= res["max_concurrent_requests"] <= 2 and res["ttft_ms"] is not None
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(steps) == res["engine_steps"] > 0
    assert max(s["num_running"] for s in steps) == res["max_concurrent_requests"]
    # every prompt token once, every output token but the last once (no prefix hits: prompts < one block)
    assert res["prefix_hit_rate"] == 0 and res["num_preemptions"] == 0
    assert sum(s["num_tokens"] for s in steps) == res["total_input_tokens"] + res["total_output_tokens"] - 6
    assert capsys.readouterr().out.count("trtllm-bench throughput") == 1


def test_latency_on_a_tiny_preset_streams_one_at_a_time(tmp_path):
    dataset, report_file = tmp_path / "data.jsonl", tmp_path / "report.json"
    assert main(["--model", "tiny-qwen3", "prepare-dataset", "--num_requests", "3", "--input_mean", "10",
                 "--output_mean", "6", "--output", str(dataset)]) == 0
    assert main(["latency", "--model", "tiny-qwen3", "--dataset", str(dataset), "--warmup", "1",  # either place
                 "--report_json", str(report_file), "--cuda_graph_max_prefill_tokens", "0"]) == 0
    report = _report(report_file)
    assert report["config"]["options"]["cuda_graph_max_prefill_tokens"] == 0
    assert report["config"]["engine"]["cuda_graph_prefill_tokens"] == []  # none asked (and none on a CPU)
    res = report["results"]
    assert res["max_concurrent_requests"] == 1 and report["config"]["concurrency"] == 1
    assert res["tpot_ms"]["p50"] > 0 and res["itl_ms"]["p99"] >= res["itl_ms"]["p50"]
    assert report["config"]["model"]["kind"] == "preset"


def test_offline_text_prompts_on_the_demo_model_without_streaming(tmp_path, capsys):
    dataset, report_file = tmp_path / "data.jsonl", tmp_path / "report.json"
    dataset.write_text('{"task_id": 0, "prompt": "Once upon a time", "output_tokens": 3}\n'
                       '{"task_id": 1, "prompt": "The sky is", "output_tokens": 3}\n'
                       '{"task_id": 2, "prompt": "never read", "output_tokens": 3}\n')
    assert main(["throughput", "--dataset", str(dataset), "--num_requests", "2", "--warmup", "0",
                 "--report_json", str(report_file)]) == 0
    assert "(needs --streaming)" in capsys.readouterr().out
    res = _report(report_file)["results"]
    assert res["ttft_ms"] is None and res["itl_ms"] is None and res["num_requests"] == 2
    assert res["total_output_tokens"] == 6 and res["total_input_tokens"] > 2  # tokenized by the demo's tokenizer


def test_profile_writes_a_trace_and_prints_the_top_ops(tmp_path, capsys):
    trace, report_file = tmp_path / "trace.json", tmp_path / "report.json"
    assert main(["--model", "tiny-llama", "--batch_size", "2", "--input_len", "4", "--output_len", "6",
                 "--warmup", "0", "--profile", "--profile_steps", "3", "--profile_trace", str(trace),
                 "--report_json", str(report_file)]) == 0
    out = capsys.readouterr().out
    assert "top CPU ops by self time" in out
    profile = _report(report_file)["results"]["profile"]
    assert profile["steps"] == 3 and profile["top"] and json.loads(trace.read_text())["traceEvents"]


def _refused(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_bad_input_is_refused_before_anything_runs(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input_ids": [1, 2], "output_tokens": 2}\n{"input_ids": [1, 2], "output_tokens": 2\n')
    _refused(capsys, ["throughput", "--dataset", str(data)], "data.jsonl line 2: not valid JSON")
    data.write_text('{"input_ids": [1], "output_tokens": 2}\n\n{"input_ids": [1, 2]}\n')
    _refused(capsys, ["latency", "--dataset", str(data)], "data.jsonl line 3: missing field output_tokens")
    _refused(capsys, ["--model", "llama-4-8b", "--batch_size", "1", "--input_len", "4", "--output_len", "4"],
             "unknown model 'llama-4-8b'", "llama-3.1-8b", "llama-3.2-1b", "qwen3-8b")
    _refused(capsys, ["--model", str(tmp_path / "nowhere"), "--batch_size", "1", "--input_len", "4",
                      "--output_len", "4"], "nowhere' does not exist")
    _refused(capsys, ["throughput", "--dataset", str(tmp_path / "missing.jsonl")], "missing.jsonl' does not exist")
    _refused(capsys, ["--batch_size", "1", "--input_len", "500", "--output_len", "20"],  # the demo: 512
             "500 input + 20 output tokens = 520, more than the model's context")
    data.write_text('{"input_ids": [1], "output_tokens": 2}\n' + json.dumps(
        {"input_ids": [1] * 1000, "output_tokens": 100}) + "\n")
    _refused(capsys, ["--model", "tiny-llama", "throughput", "--dataset", str(data)],
             "data.jsonl line 2: 1000 input + 100 output tokens", "max_position_embeddings) = 1024")
    _refused(capsys, ["--model", "tiny-llama", "throughput", "--dataset", str(data), "--max_seq_len", "600"],
             "line 2", "more than --max_seq_len = 600")
    data.write_text('{"input_ids": [1, 512], "output_tokens": 2}\n')
    _refused(capsys, ["--model", "tiny-llama", "throughput", "--dataset", str(data)],
             "line 1: token id 512 is outside the model's vocabulary [0, 512)")
    data.write_text('{"prompt": "hello", "output_tokens": 2}\n')
    _refused(capsys, ["--model", "tiny-llama", "latency", "--dataset", str(data)],
             "line 1: a text prompt needs a tokenizer")
    _refused(capsys, ["--batch_size", "2", "throughput", "--dataset", str(data)], "--batch_size: the flat form's")
    _refused(capsys, ["--input_len", "4", "--output_len", "4"], "missing: --batch_size")
    _refused(capsys, ["--batch_size", "1", "--input_len", "4", "--output_len", "4", "--report_json",
                      str(tmp_path / "no" / "r.json")], "its directory does not exist")
    _refused(capsys, ["--batch_size", "1", "--input_len", "4", "--output_len", "4", "--report_json",
                      "/proc/r.json"], "its directory does not take files")
    _refused(capsys, ["--batch_size", "1", "--input_len", "4", "--output_len", "4", "--iteration_log",
                      str(tmp_path)], "it is a directory")
    _refused(capsys, ["--batch_size", "1", "--input_len", "4", "--output_len", "4", "--max_num_tokens", "0"],
             "max_num_tokens=0")
    _refused(capsys, ["--model", "tiny-llama", "--batch_size", "1", "--input_len", "4", "--output_len", "4",
                      "--cuda_graph_max_prefill_tokens", "-1"], "max_prefill_tokens")



def test_prepare_dataset_refuses_what_it_cannot_draw_or_write(tmp_path, capsys):
    prepare = ["--model", "tiny-llama", "prepare-dataset", "--num_requests", "2", "--output_mean", "4"]
    _refused(capsys, [*prepare, "--input_mean", "nan"], "input_mean must be a finite number >= 1, got nan")
    _refused(capsys, [*prepare, "--input_mean", "4", "--input_stdev", "inf"], "input_stdev must be a finite")
    _refused(capsys, [*prepare, "--input_mean", "4", "--output", str(tmp_path)], "it is a directory")
    _refused(capsys, [*prepare, "--input_mean", "4", "--output", str(tmp_path / "no" / "d.jsonl")],
             "cannot write --output", "its directory does not exist")


def test_options_the_engine_would_not_read_are_refused(capsys, monkeypatch):
    import trtllm.runtime.llm as llm_module

    def built(*args, **kwargs):
        raise AssertionError("the engine was built without an option given")
    monkeypatch.setattr(llm_module, "LLM", built)
    _refused(capsys, ["--model", "tiny-llama", "--batch_size", "2", "--input_len", "4", "--output_len", "4",
                      "--max_batch_size", "0"], "bad option", "max_batch_size=0: must be greater than 0")
    _refused(capsys, ["--batch_size", "2", "--input_len", "4", "--output_len", "4", "--speculative_model_dir", "d"],
             "bad option", "--speculative_model_dir: is for --speculative draft_target, eagle3 or mtp")


FLAT = ["--batch_size", "1", "--input_len", "4", "--output_len", "4"]


@pytest.mark.parametrize("argv, words", [  # options with a default, given alone: they were silently unused
    ([*FLAT, "--max_draft_len", "3"], "bad option: --max_draft_len: is for --speculative ngram, draft_target, "
                                      "eagle3 or mtp; no --speculative given"),
    ([*FLAT, "--speculative", "eagle3", "--speculative_model_dir", "d", "--max_matching_ngram_size", "2"],
     "bad option: --max_matching_ngram_size: is for --speculative ngram, not eagle3"),
    ([*FLAT, "--profile_steps", "3"], "--profile_steps needs --profile"),
    ([*FLAT, "--profile_trace", "t.json", "--profile_steps", "3"], "--profile_trace, --profile_steps need --profile"),
    (["--model", "tiny-llama", "latency", "--dataset", "DATA", "--profile_steps", "3"], "needs --profile"),
    (["--seed", "3", "throughput", "--dataset", "DATA"], "--seed draws a preset's weights and the flat form's "
                                                           "prompts: model 'demo' is a checkpoint"),
    (["--warmup", "3", "--dtype", "float16", "prepare-dataset", "--num_requests", "1", "--input_mean", "4",
      "--output_mean", "2"], "--dtype, --warmup: not options of prepare-dataset"),
])
def test_an_option_given_without_what_reads_it_is_refused(argv, words, tmp_path, capsys, monkeypatch):
    import trtllm.cli.model_arg as model_arg
    import trtllm.runtime.llm as llm_module

    def built(*args, **kwargs):
        raise AssertionError("the engine was built for an option it never reads")
    monkeypatch.setattr(llm_module, "LLM", built)
    monkeypatch.setattr(model_arg, "build_preset", built)
    data = tmp_path / "data.jsonl"
    data.write_text('{"input_ids": [1, 2], "output_tokens": 2}\n')
    _refused(capsys, [str(data) if a == "DATA" else a for a in argv], words)


def test_prepare_dataset_reads_the_seed_given_before_it(capsys):
    assert main(["--model", "tiny-llama", "--seed", "1", "prepare-dataset", "--num_requests", "1",
                 "--input_mean", "4", "--output_mean", "2"]) == 0
    out = capsys.readouterr().out
    assert main(["--model", "tiny-llama", "--seed", "2", "prepare-dataset", "--num_requests", "1",
                 "--input_mean", "4", "--output_mean", "2"]) == 0
    assert out != capsys.readouterr().out  # the seed drew other token ids


@pytest.mark.parametrize("option, words", [(["--quantization", "FP9"], "QuantConfig.quant_algo='FP9'"),
                                           (["--cuda_graph_max_prefill_tokens", "-1"], "max_prefill_tokens")])
def test_a_bad_engine_option_is_refused_before_a_presets_weights_are_made(option, words, capsys, monkeypatch):
    import trtllm.cli.model_arg as model_arg

    def made(*args, **kwargs):
        raise AssertionError("the preset's weights were made for an option that is refused")
    monkeypatch.setattr(model_arg, "build_preset", made)
    _refused(capsys, ["--model", "tiny-llama", "--batch_size", "1", "--input_len", "4", "--output_len", "4", *option],
             "bad option", words)


@pytest.mark.parametrize("value, words", [("-1", "temperature=-1.0: must be greater than or equal to 0"),
                                          ("nan", "temperature=nan: must be a finite number")])
def test_a_bad_temperature_is_refused_before_the_engine_is_built(value, words, capsys, monkeypatch):
    import trtllm.runtime.llm as llm_module

    def built(*args, **kwargs):
        raise AssertionError("the engine was built for a --temperature that every request refuses")
    monkeypatch.setattr(llm_module, "LLM", built)
    _refused(capsys, ["--temperature", value, "--batch_size", "1", "--input_len", "4", "--output_len", "4"],
             "bad option", words)

def test_throughput_on_the_tiny_deepseek_preset_pages_the_latent(tmp_path):
    """The MLA preset through trtllm-bench: the report's KV pool is the latent cache, one row of
    kv_lora_rank + qk_rope_head_dim (32 + 8) fp32 values per token and layer (2 layers)."""
    dataset, report_file = tmp_path / "data.jsonl", tmp_path / "report.json"
    assert main(["--model", "tiny-deepseek-v2", "prepare-dataset", "--num_requests", "4", "--input_mean", "10",
                 "--output_mean", "5", "--output", str(dataset)]) == 0
    assert main(["throughput", "--model", "tiny-deepseek-v2", "--dataset", str(dataset),
                 "--report_json", str(report_file)]) == 0
    pool = _report(report_file)["results"]["kv_pool"]
    assert pool["bytes"] == pool["blocks"] * pool["tokens_per_block"] * 2 * (32 + 8) * 4, pool


def test_expert_load_on_the_tiny_mixtral_preset(tmp_path, capsys):
    """--expert_load: per MoE block, the timed run's tokens per expert, which add up to top-k
    slots for every token computed (prompts and decoded tokens; warm-up left out)."""
    report_file = tmp_path / "report.json"
    assert main(["--model", "tiny-mixtral", "--batch_size", "3", "--input_len", "6", "--output_len", "4",
                 "--warmup", "1", "--expert_load", "--report_json", str(report_file)]) == 0
    res = _report(report_file)["results"]
    load = res["expert_load"]
    assert res["prefix_hit_rate"] == 0.0
    computed = res["total_input_tokens"] + res["total_output_tokens"] - res["num_requests"]
    assert len(load["blocks"]) == 2, load  # two MoE layers
    for block in load["blocks"].values():
        assert block["tokens"] == 2 * computed and sum(block["tokens_per_expert"]) == block["tokens"], block
        assert block["max"] == max(block["tokens_per_expert"]) and block["imbalance"] >= 1.0
    assert "expert load           2 MoE blocks" in capsys.readouterr().out


def test_expert_load_is_off_by_default(tmp_path):
    report_file = tmp_path / "report.json"
    assert main(["--model", "tiny-mixtral", "--batch_size", "1", "--input_len", "4", "--output_len", "2", "--warmup", "0", "--report_json", str(report_file)]) == 0
    assert _report(report_file)["results"]["expert_load"] is None
