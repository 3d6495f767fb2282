"""`trtllm-bench` datasets: TensorRT-LLM's JSONL layout, read, checked, and made up.

One JSON object a line (blank lines are skipped):

    {"task_id": 0, "input_ids": [1, 2, 3], "output_tokens": 128}
    {"task_id": 1, "prompt": "Once upon a time", "output_tokens": 64}

`output_tokens` (tokens to generate, >= 1) and one of `input_ids` (token ids) or `prompt`
(text, tokenized with the model's tokenizer before the run) are required; `task_id` is
optional (default: the line number). Any other key is refused by name, so a typo never
silently means "default".

    read_dataset(path) -> list[BenchRequest]            DatasetError naming file and line
    synthetic_requests(n, input_mean, input_stdev, output_mean, output_stdev, vocab_size, seed)
    write_dataset(requests, file)                       the same layout, token ids
    tokenize_prompts(requests, tokenizer) -> list[BenchRequest]   text prompts to token ids
    check_requests(requests, vocab_size, max_seq_len, limit_name)  DatasetError if one cannot run
    prepare_dataset(args)                               `trtllm-bench prepare-dataset`
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

_KEYS = {"task_id", "input_ids", "prompt", "output_tokens"}


class DatasetError(ValueError):
    """A dataset that cannot be run as given; the message names the file and line."""


@dataclass(frozen=True)
class BenchRequest:
    task_id: int | str
    output_tokens: int
    input_ids: list[int] | None = None
    prompt: str | None = None
    where: str = ""  # "FILE line N" or "request N": how errors name it

    @property
    def input_len(self) -> int:
        if self.input_ids is None:
            raise ValueError(f"{self.where}: a text prompt has no length before it is tokenized")
        return len(self.input_ids)


def read_dataset(path: str | Path) -> list[BenchRequest]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {str(path)!r} does not exist" if not path.exists()
                           else f"dataset {str(path)!r} is not a file")
    requests = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                requests.append(_parse_line(line, f"{path.name} line {number}", number))
    if not requests:
        raise DatasetError(f"dataset {str(path)!r} has no requests")
    return requests


def _parse_line(line: str, where: str, number: int) -> BenchRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise DatasetError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    if "output_tokens" not in obj:
        raise DatasetError(f"{where}: missing field output_tokens (the number of tokens to generate)")
    out = obj["output_tokens"]
    if not _is_int(out) or out < 1:
        raise DatasetError(f"{where}: output_tokens must be an integer >= 1, got {out!r}")
    has_ids, has_prompt = "input_ids" in obj, "prompt" in obj
    if has_ids == has_prompt:
        raise DatasetError(f"{where}: " + ("give one of input_ids and prompt, not both" if has_ids
                                           else "missing field input_ids (or prompt)"))
    ids, prompt = obj.get("input_ids"), obj.get("prompt")
    if has_ids and (not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids)):
        raise DatasetError(f"{where}: input_ids must be a non-empty list of token ids (integers >= 0)")
    if has_prompt and (not isinstance(prompt, str) or not prompt):
        raise DatasetError(f"{where}: prompt must be a non-empty string")
    task_id = obj.get("task_id", number)
    if not (_is_int(task_id) or isinstance(task_id, str)):
        raise DatasetError(f"{where}: task_id must be an integer or a string, got {task_id!r}")
    return BenchRequest(task_id, out, ids, prompt, where)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def synthetic_requests(num_requests: int, input_mean: float, input_stdev: float, output_mean: float,
                       output_stdev: float, vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    """Token-id prompts with normal-distributed lengths (rounded, at least 1), ids uniform
    in [0, vocab_size); the same seed gives the same requests."""
    if num_requests < 1:
        raise DatasetError(f"num_requests must be >= 1, got {num_requests}")
    for name, v, least in (("input_mean", input_mean, 1), ("output_mean", output_mean, 1),
                           ("input_stdev", input_stdev, 0), ("output_stdev", output_stdev, 0)):
        if not math.isfinite(v) or v < least:  # nan / inf: no length to round (was a traceback)
            raise DatasetError(f"{name} must be a finite number >= {least}, got {v}")
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        n_in = max(1, round(rng.gauss(input_mean, input_stdev)))
        n_out = max(1, round(rng.gauss(output_mean, output_stdev)))
        ids = [rng.randrange(vocab_size) for _ in range(n_in)]
        requests.append(BenchRequest(i, n_out, ids, None, f"request {i}"))
    return requests


def write_dataset(requests: list[BenchRequest], f: TextIO) -> None:
    for r in requests:
        obj = {"task_id": r.task_id}
        obj.update({"input_ids": r.input_ids} if r.input_ids is not None else {"prompt": r.prompt})
        obj["output_tokens"] = r.output_tokens
        f.write(json.dumps(obj, separators=(",", ":")) + "\n")


def tokenize_prompts(requests: list[BenchRequest], tokenizer, model_name: str) -> list[BenchRequest]:
    """Text prompts as token ids (with the tokenizer's special tokens, as LLM.generate
    tokenizes); DatasetError if there is text and no tokenizer."""
    out = []
    for r in requests:
        if r.input_ids is None:
            if tokenizer is None:
                raise DatasetError(f"{r.where}: a text prompt needs a tokenizer and model {model_name!r} has "
                                   "none; give input_ids (`trtllm-bench prepare-dataset` writes them)")
            r = dataclasses.replace(r, input_ids=tokenizer.encode(r.prompt))
        out.append(r)
    return out


def check_requests(requests: list[BenchRequest], vocab_size: int | None, max_seq_len: int | None,
                   limit_name: str) -> None:
    """Every request fits: token ids inside the vocabulary, prompt + output within
    max_seq_len (`limit_name` says where that limit comes from)."""
    for r in requests:
        if vocab_size is not None:
            bad = next((t for t in r.input_ids if t >= vocab_size), None)
            if bad is not None:
                raise DatasetError(f"{r.where}: token id {bad} is outside the model's vocabulary [0, {vocab_size})")
        if max_seq_len is not None and r.input_len + r.output_tokens > max_seq_len:
            raise DatasetError(f"{r.where}: {r.input_len} input + {r.output_tokens} output tokens = "
                               f"{r.input_len + r.output_tokens}, more than {limit_name} = {max_seq_len}")


def prepare_dataset(args) -> int:
    """`trtllm-bench prepare-dataset`: synthetic requests for the model, to --output or stdout."""
    from trtllm.cli.model_arg import resolve_model
    from trtllm.cli.output_paths import unwritable_reason

    if args.output is not None and args.stdout:
        raise DatasetError("give --output FILE or --stdout, not both")
    why = unwritable_reason(args.output) if args.output is not None else None
    if why is not None:  # before drawing the requests (a directory was an IsADirectoryError traceback)
        raise DatasetError(f"cannot write --output {args.output!r}: {why}")
    spec = resolve_model(args.model)
    if spec.vocab_size is None:
        raise DatasetError(f"model {spec.name!r} names no vocab_size in its config.json: no token ids to draw")
    requests = synthetic_requests(args.num_requests, args.input_mean, args.input_stdev, args.output_mean,
                                  args.output_stdev, spec.vocab_size, args.seed)
    check_requests(requests, None, spec.max_position_embeddings, "the model's context (max_position_embeddings)")
    if args.output is None:
        write_dataset(requests, sys.stdout)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            write_dataset(requests, f)
        print(f"trtllm-bench: wrote {len(requests)} requests to {args.output}", file=sys.stderr)
    return 0
