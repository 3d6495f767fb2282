"""trtllm-bench datasets: TensorRT-LLM's JSONL layout read, refused by line, and made up."""
import io
import json

import pytest

from trtllm.cli.bench_dataset import (
    DatasetError,
    check_requests,
    read_dataset,
    synthetic_requests,
    tokenize_prompts,
    write_dataset,
)


def _write(tmp_path, *lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_token_ids_and_prompts_skipping_blank_lines(tmp_path):
    path = _write(tmp_path, '{"task_id": 7, "input_ids": [1, 2, 3], "output_tokens": 4}', "",
                  '{"prompt": "hello", "output_tokens": 2}')
    a, b = read_dataset(path)
    assert (a.task_id, a.input_ids, a.output_tokens, a.where) == (7, [1, 2, 3], 4, "data.jsonl line 1")
    assert (b.task_id, b.prompt, b.input_ids, b.where) == (3, "hello", None, "data.jsonl line 3")


@pytest.mark.parametrize("line, message", [
    ('{"input_ids": [1, 2], "output_tokens": 3', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected a JSON object, got list"),
    ('{"input_ids": [1, 2]}', "line 2: missing field output_tokens"),
    ('{"output_tokens": 3}', "line 2: missing field input_ids (or prompt)"),
    ('{"input_ids": [1], "prompt": "x", "output_tokens": 3}', "line 2: give one of input_ids and prompt"),
    ('{"input_ids": [], "output_tokens": 3}', "line 2: input_ids must be a non-empty list"),
    ('{"input_ids": [1, -2], "output_tokens": 3}', "line 2: input_ids must be a non-empty list"),
    ('{"input_ids": [1], "output_tokens": 0}', "line 2: output_tokens must be an integer >= 1"),
    ('{"input_ids": [1], "output_tokens": true}', "line 2: output_tokens must be an integer >= 1"),
    ('{"input_ids": [1], "output_tokens": 3, "lora_request": {}}', "line 2: unknown field(s) lora_request"),
])
def test_a_bad_line_is_refused_with_its_number(tmp_path, line, message):
    path = _write(tmp_path, '{"input_ids": [1], "output_tokens": 1}', line)
    with pytest.raises(DatasetError) as e:
        read_dataset(path)
    assert message in str(e.value) and "data.jsonl" in str(e.value)


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(DatasetError, match="nowhere.jsonl' does not exist"):
        read_dataset(tmp_path / "nowhere.jsonl")
    with pytest.raises(DatasetError, match="has no requests"):
        read_dataset(_write(tmp_path, ""))


def test_synthetic_requests_are_seeded_normal_lengths_and_round_trip(tmp_path):
    a = synthetic_requests(200, 50, 10, 20, 5, vocab_size=100, seed=3)
    assert a == synthetic_requests(200, 50, 10, 20, 5, vocab_size=100, seed=3)
    assert a != synthetic_requests(200, 50, 10, 20, 5, vocab_size=100, seed=4)
    lengths = [r.input_len for r in a]
    mean = sum(lengths) / len(lengths)
    stdev = (sum((n - mean) ** 2 for n in lengths) / len(lengths)) ** 0.5
    assert 47 < mean < 53 and 8 < stdev < 12
    assert all(0 <= t < 100 for r in a for t in r.input_ids)
    fixed = synthetic_requests(3, 16, 0, 8, 0, vocab_size=100)
    assert [(r.input_len, r.output_tokens) for r in fixed] == [(16, 8)] * 3
    out = io.StringIO()
    write_dataset(a, out)
    first = json.loads(out.getvalue().splitlines()[0])
    assert set(first) == {"task_id", "input_ids", "output_tokens"}
    path = tmp_path / "synthetic.jsonl"
    path.write_text(out.getvalue())
    assert [(r.input_ids, r.output_tokens) for r in read_dataset(path)] == [(r.input_ids, r.output_tokens) for r in a]
    with pytest.raises(DatasetError, match="input_stdev must be a finite number >= 0, got -1"):
        synthetic_requests(1, 5, -1, 5, 0, vocab_size=10)


@pytest.mark.parametrize("args, message", [
    ((float("nan"), 0, 5, 0), "input_mean must be a finite number >= 1, got nan"),
    ((5, 0, float("inf"), 0), "output_mean must be a finite number >= 1, got inf"),
    ((5, float("nan"), 5, 0), "input_stdev must be a finite number >= 0, got nan"),
    ((5, 0, 5, float("inf")), "output_stdev must be a finite number >= 0, got inf"),
])
def test_non_finite_lengths_are_refused_by_name(args, message):
    with pytest.raises(DatasetError, match=message):
        synthetic_requests(2, *args, vocab_size=10)


def test_checks_name_the_request_that_cannot_run(tmp_path):
    requests = read_dataset(_write(tmp_path, '{"input_ids": [1, 2], "output_tokens": 3}',
                                   '{"input_ids": [1, 99], "output_tokens": 3}'))
    with pytest.raises(DatasetError, match=r"line 2: token id 99 is outside the model's vocabulary \[0, 50\)"):
        check_requests(requests, 50, None, "")
    with pytest.raises(DatasetError, match=r"line 1: 2 input \+ 3 output tokens = 5, more than the context = 4"):
        check_requests(requests, None, 4, "the context")
    check_requests(requests, 100, 5, "the context")
    text = read_dataset(_write(tmp_path, '{"prompt": "hi", "output_tokens": 3}'))
    with pytest.raises(DatasetError, match="line 1: a text prompt needs a tokenizer and model 'm' has none"):
        tokenize_prompts(text, None, "m")
