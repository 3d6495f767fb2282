"""Multiple-choice tasks: each published layout's rows as `MCDoc`s, with lm-evaluation-harness's
prompts (its default task YAMLs), so figures compare with lm-eval's.

    docs = MMLU.read(rows)          # rows from trtllm.eval.datasets.read_rows
    MC_TASKS = {"mmlu": MMLU, "hellaswag": HELLASWAG, "arc": ARC, "demo-mc": DEMO_MC}

A doc is a context and its choices; a choice is scored as the continuation
`delimiter + choice` of `description + few-shot examples + context`, a few-shot example
being `context + delimiter + right choice + "\\n\\n"`.

- MMLU (cais/mmlu parquet or JSON of the same fields): question, choices (a list),
  answer (0-based index, or a letter), subject (optional). Prompt: "<question>\\nA. ..\\nB.
  ..\\nAnswer:", choices " A", " B", ...; the description names the subject. acc only.
- HellaSwag (rowanz/hellaswag JSONL, the HF parquet): ctx (or ctx_a + ctx_b), endings,
  label, activity_label (optional); lm-eval's preprocessing of the bracketed tags. acc, acc_norm.
- ARC (AI2's JSONL: question {stem, choices [{text, label}]}, answerKey; or the HF
  parquet: question, choices {text: [...], label: [...]}, answerKey). "Question: ..\\nAnswer:".
  acc, acc_norm.
- demo-mc (the demo model's own, trtllm/demo_model/eval_mc.jsonl): context, choices, label;
  the choices are continuations as they stand. acc, acc_norm.

acc_norm divides each choice's log-likelihood by its length in characters (lm-eval's).
"""
from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from trtllm.eval.datasets import Row
from trtllm.eval.scorer import EvalInputError


@dataclass
class MCDoc:
    context: str
    choices: list[str]
    gold: int
    group: str | None = None   # MMLU's subject: few-shot examples and a figure per group


@dataclass
class MCTask:
    name: str
    layout: str                         # the fields a row needs, for errors
    doc: Callable[[Row, str], MCDoc]    # (row, layout) -> doc
    delimiter: str = " "                # between context and choice
    acc_norm: bool = True
    description: Callable[[MCDoc], str] = lambda doc: ""

    def read(self, rows: list[Row]) -> list[MCDoc]:
        docs = [self.doc(row, self.layout) for row in rows]
        for row, d in zip(rows, docs):
            if len(d.choices) < 2:
                raise EvalInputError(f"{row.where}: {len(d.choices)} choice(s); a question needs at least 2")
            if not 0 <= d.gold < len(d.choices):
                raise EvalInputError(f"{row.where}: answer {d.gold} is not one of the {len(d.choices)} choices")
        return docs


def _strings(row: Row, name: str, layout: str, value=None) -> list[str]:
    value = row.get(name, list, layout) if value is None else value
    if not all(isinstance(v, str) for v in value):
        raise EvalInputError(f"{row.where}: {name!r} must be a list of strings")
    return value


def _index(row: Row, name: str, layout: str, labels: list[str]) -> int:
    """An answer given as a 0-based index (int or digit string) or as one of `labels`."""
    value = row.get(name, (int, str), layout)
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        if not value.strip().isdigit():
            raise EvalInputError(f"{row.where}: {name!r} {value!r} is neither an index nor one of {labels}")
        value = int(value)
    return value


# -- MMLU --------------------------------------------------------------------------------------
def _mmlu_doc(row: Row, layout: str) -> MCDoc:
    question = row.get("question", str, layout).strip()
    choices = _strings(row, "choices", layout)
    letters = list(string.ascii_uppercase[:len(choices)])
    subject = row.fields.get("subject")
    text = question + "".join(f"\n{letter}. {c}" for letter, c in zip(letters, choices)) + "\nAnswer:"
    return MCDoc(text, letters, _index(row, "answer", layout, letters), subject if isinstance(subject, str) else None)


MMLU = MCTask("mmlu", "question, choices, answer[, subject]", _mmlu_doc, acc_norm=False,
              description=lambda doc: "The following are multiple choice questions (with answers)"
              f"{' about ' + doc.group.replace('_', ' ') if doc.group else ''}.\n\n")


# -- HellaSwag ---------------------------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag preprocess: WikiHow's [title] tags become sentence breaks, other
    bracketed tags go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(row: Row, layout: str) -> MCDoc:
    if "ctx_a" in row.fields:
        ctx = row.get("ctx_a", str, layout) + " " + row.get("ctx_b", str, layout).capitalize()
    else:
        ctx = row.get("ctx", str, layout)
    label = row.fields.get("activity_label")
    query = _hellaswag_clean(f"{label}: {ctx}" if isinstance(label, str) and label else ctx)
    endings = [_hellaswag_clean(e) for e in _strings(row, "endings", layout)]
    gold = row.get("label", (int, str), layout)
    if gold == "":
        raise EvalInputError(f"{row.where}: 'label' is empty (HellaSwag's test split has no answers; use validation)")
    return MCDoc(query, endings, _index(row, "label", layout, []))


HELLASWAG = MCTask("hellaswag", "ctx (or ctx_a, ctx_b), endings, label[, activity_label]", _hellaswag_doc)


# -- ARC ---------------------------------------------------------------------------------------
def _arc_doc(row: Row, layout: str) -> MCDoc:
    question = row.get("question", (dict, str), layout)
    if isinstance(question, dict):  # AI2's JSONL
        stem = question.get("stem")
        if not isinstance(stem, str) or not isinstance(question.get("choices"), list):
            raise EvalInputError(f"{row.where}: 'question' must hold 'stem' and a 'choices' list (expected {layout})")
        choices = question["choices"]
        if not all(isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("label"), str)
                   for c in choices):
            raise EvalInputError(f"{row.where}: each choice must hold 'text' and 'label' strings")
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
    else:  # the HF parquet
        stem, choices = question, row.get("choices", dict, layout)
        texts = _strings(row, "choices.text", layout, choices.get("text") or [])
        labels = _strings(row, "choices.label", layout, choices.get("label") or [])
        if len(texts) != len(labels):
            raise EvalInputError(f"{row.where}: {len(texts)} choice texts but {len(labels)} labels")
    key = row.get("answerKey", str, layout)
    if key not in labels:
        raise EvalInputError(f"{row.where}: answerKey {key!r} is not one of the labels {labels}")
    return MCDoc(f"Question: {stem}\nAnswer:", texts, labels.index(key))


ARC = MCTask("arc", "question {stem, choices [{text, label}]} or question + choices {text, label}, answerKey",
             _arc_doc)


# -- the demo model's task ---------------------------------------------------------------------
def _demo_doc(row: Row, layout: str) -> MCDoc:
    choices = _strings(row, "choices", layout)
    return MCDoc(row.get("context", str, layout), choices, _index(row, "label", layout, []))


DEMO_MC = MCTask("demo-mc", "context, choices, label", _demo_doc, delimiter="")

MC_TASKS = {t.name: t for t in (MMLU, HELLASWAG, ARC, DEMO_MC)}
