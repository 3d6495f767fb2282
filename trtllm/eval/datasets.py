"""Rows of local dataset files, in the layouts datasets are published in; nothing is fetched.

    rows = read_rows(path)      # a file, or a directory: every dataset file in it, sorted
    row.where                   # "mmlu.jsonl line 12": for errors naming the row
    row.get("question", str)    # the field, or EvalInputError naming row, field and type

Formats by suffix: `.jsonl` (one JSON object a line; blank lines skipped), `.json` (a list
of objects, or an object holding one such list, as some dumps wrap them), `.parquet` (what
the Hugging Face hub stores; read with pyarrow). A line that is not JSON, or a row that is
not an object, is refused with its line (or row) number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trtllm.eval.scorer import EvalInputError

SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Row:
    where: str
    fields: dict

    def get(self, name: str, kind: type | tuple[type, ...], layout: str = ""):
        if name not in self.fields:
            expected = f" (expected {layout})" if layout else ""
            raise EvalInputError(f"{self.where}: no {name!r} field{expected}")
        value = self.fields[name]
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in _tuple(kind):
            names = " or ".join(k.__name__ for k in _tuple(kind))
            raise EvalInputError(f"{self.where}: {name!r} must be {names}, got {type(value).__name__} {value!r:.60}")
        return value


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def read_rows(path: str | Path) -> list[Row]:
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"dataset path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise EvalInputError(f"dataset directory {str(path)!r} holds no {', '.join(SUFFIXES)} file")
        return [row for f in files for row in read_rows(f)]
    if path.suffix == ".jsonl":
        rows = _jsonl(path)
    elif path.suffix == ".json":
        rows = _json(path)
    elif path.suffix == ".parquet":
        rows = _parquet(path)
    else:
        raise EvalInputError(f"dataset file {str(path)!r}: unknown format (expected {', '.join(SUFFIXES)})")
    if not rows:
        raise EvalInputError(f"dataset file {str(path)!r} holds no rows")
    return rows


def _jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_row(where, value))
    return rows


def _json(path: Path) -> list[Row]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path.name} line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise EvalInputError(f"{path.name}: expected a list of rows, or an object holding one list of them")
        value = lists[0]
    if not isinstance(value, list):
        raise EvalInputError(f"{path.name}: expected a list of rows, got {type(value).__name__}")
    return [_row(f"{path.name} row {i}", v) for i, v in enumerate(value, 1)]


def _parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalInputError(f"{path.name}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors name no file
        raise EvalInputError(f"{path.name}: not a readable parquet file ({e})") from None
    return [Row(f"{path.name} row {i}", v) for i, v in enumerate(table.to_pylist(), 1)]


def _row(where: str, value) -> Row:
    if not isinstance(value, dict):
        raise EvalInputError(f"{where}: a row must be a JSON object, got {type(value).__name__}")
    return Row(where, value)
