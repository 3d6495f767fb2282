"""trtllm-run on the built-in demo model and on a tiny checkpoint."""
import io
import sys

import pytest

from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import CHATML_TEMPLATE, make_tokenizer
from trtllm.cli.run import main


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # many steps: the ops' torch references


def test_demo_model_streams_text(capsys):
    assert main(["Once upon a time", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out.strip()) > len("Once upon a time")


def test_chat_prompts_from_stdin(tmp_path, monkeypatch, capsys):
    write_checkpoint("qwen3", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path, chat_template=CHATML_TEMPLATE)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\nthe fox\n"))
    assert main(["--model", str(tmp_path), "--chat", "--max-tokens", "5", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "hello there" in out and "the fox" in out


def test_a_chat_prompt_gets_the_templates_bos_once(tmp_path, monkeypatch, capsys):
    # the template writes <|im_start|> first and the tokenizer adds it to text (Llama 3's BOS, so):
    # the rendered chat was tokenized with add_special_tokens, and had it twice
    from tokenizers import Tokenizer, processors

    from trtllm.runtime.llm import LLM
    write_checkpoint("qwen3", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path, chat_template=CHATML_TEMPLATE)
    backend = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    backend.save(str(tmp_path / "tokenizer.json"))
    prompts = []
    prepare = LLM._prepare
    monkeypatch.setattr(LLM, "_prepare", lambda self, *a, **k: prompts.append(prepare(self, *a, **k)) or prompts[-1])
    assert main(["--model", str(tmp_path), "--chat", "--max-tokens", "2", "--dtype", "float32", "hi"]) == 0
    assert prompts[0].prompt_token_ids[0] == bos != prompts[0].prompt_token_ids[1]


def test_bad_options_and_missing_model_fail_clearly(tmp_path, capsys):
    assert main(["hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["hi", "--model", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["hi", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "config.json: not valid JSON" in err and "Traceback" not in err


def test_ctrl_c_exits_quietly(monkeypatch, capsys):
    import trtllm.runtime.llm as llm_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(llm_module.LLM, "generate", interrupted)
    assert main(["Once upon a time", "--max-tokens", "4"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_top_k_minus_one_is_no_limit_and_bad_sampling_options_are_one_line(capsys):
    assert main(["Once", "--max-tokens", "2", "--top-k", "-1"]) == 0
    capsys.readouterr()
    assert main(["hi", "--top-p", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "trtllm-run: bad sampling option: SamplingParams.top_p=nan: must be a finite number"


@pytest.mark.parametrize("option, value, field", [("--max-seq-len", "0", "BuildConfig.max_seq_len"),
                                                  ("--kv-cache-max-tokens", "0", "KvCacheConfig.max_tokens")])
def test_bad_engine_options_are_one_line(option, value, field, capsys):
    assert main(["hi", option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"trtllm-run: bad option: {field}=0") and "Traceback" not in err


def test_a_refused_prompt_is_said_and_the_next_ones_run(tmp_path, capsys):
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path)  # no chat template
    model = ["--model", str(tmp_path), "--dtype", "float32", "--max-tokens", "3"]
    assert main([*model, "--max-seq-len", "16", "", "a prompt much longer than sixteen tokens, surely", "hi"]) == 1
    captured = capsys.readouterr()
    assert "trtllm-run: prompt '': the prompt is empty" in captured.err
    assert "more than max_input_len=16" in captured.err and "Traceback" not in captured.err
    assert captured.out.startswith("hi") and len(captured.out.strip()) > 2
    assert main([*model, "--chat", "hi"]) == 1
    err = capsys.readouterr().err
    assert "has no chat template" in err and "Traceback" not in err
