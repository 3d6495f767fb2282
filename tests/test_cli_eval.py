"""trtllm-eval end to end: the demo model's perplexity and multiple-choice task, each
local-file task and lm-eval on a tiny checkpoint, the JSON report's keys; bad input is one
line on stderr and exit status 2, before anything runs."""
import json
import subprocess
import sys

import pytest

from tests.eval.test_lm_eval_adapter import BODIES, MC, TASK
from tests.eval.test_tasks import ARC_JSONL, GSM_ROWS, HELLASWAG_ROWS, MMLU_ROWS
from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.cli.eval import main

REPORT_KEYS = {"task", "results", "config", "versions", "commit", "device", "seconds", "date"}


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # whole engines: the ops' torch references


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_checkpoint("llama31", tmp_path_factory.mktemp("cli_eval"), vocab_size=512)
    make_tokenizer(path)
    return path


def run(argv, capsys):
    try:
        code = main([*argv, "--no_progress"])
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_perplexity_is_its_training_figure(tmp_path, capsys):
    report = tmp_path / "report.json"
    code, out, _ = run(["--model", "demo", "--report_json", str(report), "perplexity"], capsys)
    assert code == 0
    r = json.loads(report.read_text())
    assert set(r) >= REPORT_KEYS and r["task"] == "perplexity" and r["device"] == "cpu"
    assert set(r["results"]) == {"perplexity", "bits_per_byte", "nll", "tokens", "bytes", "windows", "window", "stride"}
    training = json.loads((__import__("trtllm.demo").demo.DEMO_MODEL_DIR / "training.json").read_text())
    assert r["results"]["tokens"] == training["heldout_sample"]["tokens"] and r["results"]["window"] == 257
    # bf16 weights and cache (training.json's figure is fp32): within 0.2%
    assert r["results"]["perplexity"] == pytest.approx(training["heldout_sample"]["perplexity_cpu_fp32"], rel=2e-3)
    assert r["config"]["engine"]["dtype"] == "bfloat16" and r["config"]["entries"] is True
    assert {"torch", "transformers", "trtllm", "lm_eval"} <= set(r["versions"])
    assert "perplexity" in out and "bits_per_byte" in out


@pytest.mark.filterwarnings("ignore:FP8 KV cache without k/v scales")
@pytest.mark.parametrize("kv_dtype, element", [("fp8", "float8_e4m3fn"), ("int8", "int8")])
def test_demo_perplexity_with_a_quantized_kv_cache(kv_dtype, element, tmp_path, capsys):
    report = tmp_path / "report.json"
    code, out, _ = run(["--model", "demo", "--kv_cache_dtype", kv_dtype, "--report_json", str(report),
                        "perplexity"], capsys)
    assert code == 0 and f"{element} KV cache" in out
    r = json.loads(report.read_text())
    assert r["config"]["engine"]["kv_cache_dtype"] == element and r["config"]["kv_cache_dtype"] == kv_dtype
    training = json.loads((__import__("trtllm.demo").demo.DEMO_MODEL_DIR / "training.json").read_text())
    assert r["results"]["perplexity"] == pytest.approx(training["heldout_sample"]["perplexity_cpu_fp32"], rel=0.02)


def test_demo_mc(tmp_path, capsys):
    report = tmp_path / "r.json"
    code, out, _ = run(["demo-mc", "--limit", "12", "--dtype", "float32", "--report_json", str(report)], capsys)
    assert code == 0
    results = json.loads(report.read_text())["results"]
    assert results["n"] == 12 and set(results) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert "acc " in out and " ± " in out


@pytest.mark.parametrize("task, rows, key", [("mmlu", MMLU_ROWS[:2], "acc"), ("hellaswag", HELLASWAG_ROWS, "acc_norm"),
                                             ("arc", ARC_JSONL, "acc_norm"),
                                             ("gsm8k", GSM_ROWS, "exact_match,strict-match")])
def test_dataset_tasks_end_to_end(task, rows, key, tiny, tmp_path, capsys):
    data = tmp_path / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "r.json"
    extra = ["--max_gen_tokens", "4"] if task == "gsm8k" else []
    code, _, err = run(["--model", str(tiny), "--dtype", "float32", "--report_json", str(report), task,
                        "--dataset_path", str(data), "--num_fewshot", "1", *extra], capsys)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["results"]["n"] == len(rows) and 0.0 <= r["results"][key] <= 1.0 and f"{key}_stderr" in r["results"]
    assert r["config"]["num_fewshot"] == 1 and r["config"]["dataset"] == str(data)


def test_lm_eval_task(tiny, tmp_path, capsys):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    output_type, body = BODIES["tiny_mc"]
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(name="tiny_mc", data=data, output_type=output_type, body=body))
    report = tmp_path / "r.json"
    code, out, err = run(["--model", str(tiny), "--report_json", str(report), "lm-eval", "--tasks", "tiny_mc",
                          "--include_path", str(tmp_path), "--only_include_path"], capsys)
    assert code == 0, err
    assert "acc,none" in json.loads(report.read_text())["results"]["results"]["tiny_mc"]
    assert "tiny_mc" in out


@pytest.mark.parametrize("argv, error", [
    (["bleu"], r"argument TASK: invalid choice: 'bleu' \(choose from '?perplexity'?, '?mmlu'?, '?gsm8k'?, "
               r"'?hellaswag'?, '?arc'?, '?demo-mc'?, '?lm-eval'?\)"),
    (["mmlu"], "the following arguments are required: --dataset_path"),
    (["mmlu", "--dataset_path", "/nope/mmlu.jsonl"], "dataset path '/nope/mmlu.jsonl' does not exist"),
    (["--model", "/nope", "perplexity", "--text", "x"], "checkpoint directory '/nope' does not exist"),
    (["--model", "llama-3.2-1b", "perplexity", "--text", "x"], "is a trtllm-bench preset"),
    (["--model", "nosuch", "perplexity", "--text", "x"], "unknown model 'nosuch'.*presets: "),
    (["perplexity", "--text", "/nope.txt"], "--text '/nope.txt' does not exist"),
    (["perplexity", "--window", "600"], r"--window 600 is longer than the engine scores \(511 tokens"),
    (["perplexity", "--stride", "0"], "--stride must be positive, got 0"),
    (["--quant", "NVFP4", "perplexity"], "quant_algo=NVFP4: not implemented; supported: FP8, "),
    (["--quant", "FP9", "perplexity"], "QuantConfig.quant_algo='FP9'"),
    (["demo-mc", "--num_fewshot", "-1"], "--num_fewshot must be >= 0"),
    (["--report_json", "/nope/r.json", "perplexity"], "--report_json /nope/r.json: its directory does not exist"),
    (["--report_json", "/proc/r.json", "perplexity"], "--report_json /proc/r.json: its directory does not take files"),
    (["--report_json", "/", "perplexity"], "--report_json /: it is a directory"),
])
def test_bad_input_is_one_line_and_exit_2(argv, error, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("trtllm-eval: ")
    import re
    assert re.search(error, err), err


@pytest.mark.parametrize("argv, error", [
    (["--max_input_len", "0", "perplexity"], "BuildConfig.max_input_len=0: must be greater than 0"),
    (["lm-eval", "--tasks", "t", "--only_include_path"], "--only_include_path needs --include_path"),
    (["demo-mc", "--fewshot_path", "EVAL_MC"], "--fewshot_path needs --num_fewshot N > 0"),  # was unused
    # lm-eval's --limit is a float: nan and inf passed "must be positive" (nan <= 0 is False), 1.5 meant 1
    (["lm-eval", "--tasks", "t", "--limit", "nan"], "--limit must be a fraction of the examples (0 < F < 1) or a "
                                                     "whole number of them, got nan"),
    (["lm-eval", "--tasks", "t", "--limit", "inf"], "--limit must be a fraction of the examples"),
    (["lm-eval", "--tasks", "t", "--limit=-inf"], "--limit must be positive, got -inf"),
    (["lm-eval", "--tasks", "t", "--limit", "1.5"], "whole number of them, got 1.5"),
    (["lm-eval", "--tasks", "t", "--limit", "-2"], "--limit must be positive, got -2.0"),
    (["lm-eval", "--tasks", "t", "--bootstrap_iters", "-5"], "--bootstrap_iters must be >= 0, got -5"),
])
def test_bad_options_are_refused_before_the_engine_is_built(argv, error, capsys, monkeypatch):
    import trtllm.runtime.llm as llm_module

    def built(*args, **kwargs):
        raise AssertionError("the engine was built for options that are refused")
    monkeypatch.setattr(llm_module, "LLM", built)
    from trtllm.demo import DEMO_MODEL_DIR
    code, out, err = run([str(DEMO_MODEL_DIR / "eval_mc.jsonl") if a == "EVAL_MC" else a for a in argv], capsys)
    assert code == 2 and err.count("\n") == 1 and error in err, err


def test_malformed_rows_and_long_prompts_exit_2(tiny, tmp_path, capsys):
    data = tmp_path / "arc.jsonl"
    data.write_text(json.dumps(ARC_JSONL[0]) + "\n" + '{"question": {"stem": "q"}, "answerKey": "A"}\n')
    code, _, err = run(["--model", str(tiny), "arc", "--dataset_path", str(data)], capsys)
    assert code == 2 and "arc.jsonl line 2: 'question' must hold 'stem' and a 'choices' list" in err
    data.write_text(json.dumps(ARC_JSONL[0]) + "\n")
    code, _, err = run(["--model", str(tiny), "--max_seq_len", "16", "arc", "--dataset_path", str(data)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "request 0 has" in err and "more than the engine takes (max_input_len=16)" in err


def test_help_imports_no_torch():
    code = ("import sys\nimport trtllm.cli.eval as e\ntry:\n    e.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
