"""GSM8K: greedy generation, then exact match of the final number (lm-evaluation-harness's
gsm8k task: its prompt, stop strings and both of its answer filters).

    docs = read_docs(rows)          # question, answer ending in "#### N" (openai/gsm8k JSONL or parquet)
    results = evaluate_gsm8k(scorer, docs, fewshot_docs, num_fewshot, max_gen_tokens)

Prompt: few-shot examples "Question: <q>\\nAnswer: <worked answer>\\n\\n", then
"Question: <q>\\nAnswer:"; generation stops at "Question:" (the model starting the next
example), or at max_gen_tokens. Two figures, as lm-eval reports them:
- exact_match,strict-match: the number after "#### " in the generation;
- exact_match,flexible-extract: the last number in the generation;
each compared with the reference's "#### N" after dropping commas, "$" and a final ".".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from trtllm.eval.datasets import Row
from trtllm.eval.metrics import accuracy
from trtllm.eval.scorer import EvalInputError, Scorer

LAYOUT = "question, answer ending in '#### N'"
STOP = ["Question:", "</s>", "<|im_end|>"]
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


@dataclass
class GSMDoc:
    question: str
    answer: str     # the worked answer, "#### N" last
    target: str     # N, normalized


def normalize(number: str) -> str:
    return number.replace(",", "").replace("$", "").strip().removesuffix(".")


def read_docs(rows: list[Row]) -> list[GSMDoc]:
    docs = []
    for row in rows:
        answer = row.get("answer", str, LAYOUT)
        if "####" not in answer:
            raise EvalInputError(f"{row.where}: 'answer' has no final '#### N' line (expected {LAYOUT})")
        target = normalize(answer.split("####")[-1])
        if not target:
            raise EvalInputError(f"{row.where}: 'answer' has nothing after '####'")
        docs.append(GSMDoc(row.get("question", str, LAYOUT), answer, target))
    return docs


def prompt(doc: GSMDoc, shots: list[GSMDoc]) -> str:
    examples = "".join(f"Question: {d.question}\nAnswer: {d.answer}\n\n" for d in shots)
    return f"{examples}Question: {doc.question}\nAnswer:"


def extract(text: str) -> tuple[str | None, str | None]:
    """(strict, flexible) answers of a generation, normalized; None where none is found."""
    strict = STRICT.search(text)
    matches = FLEXIBLE.findall(text)
    flexible = next((g for g in matches[-1] if g), None) if matches else None
    return (normalize(strict.group(1)) if strict else None, normalize(flexible) if flexible else None)


def evaluate_gsm8k(scorer: Scorer, docs: list[GSMDoc], fewshot_docs: list[GSMDoc] | None = None,
                   num_fewshot: int = 0, max_gen_tokens: int = 256) -> dict:
    pool = fewshot_docs if fewshot_docs is not None else docs
    prompts = []
    for doc in docs:
        shots = [d for d in pool if d is not doc][:num_fewshot]
        if len(shots) < num_fewshot:
            raise EvalInputError(f"--num_fewshot {num_fewshot}: only {len(shots)} other examples to draw from "
                                 "(give more with --fewshot_path)")
        prompts.append(scorer.encode(prompt(doc, shots)))
    texts = scorer.generate(prompts, STOP, max_gen_tokens)  # checks every length before any runs
    answers = [extract(t) for t in texts]
    return {"n": len(docs), "num_fewshot": num_fewshot, "max_gen_tokens": max_gen_tokens,
            **accuracy("exact_match,strict-match", [s == d.target for (s, _), d in zip(answers, docs)]),
            **accuracy("exact_match,flexible-extract", [f == d.target for (_, f), d in zip(answers, docs)]),
            "samples": [{"target": d.target, "generation": t, "strict": s, "flexible": f}
                        for d, t, (s, f) in zip(docs[:5], texts, answers)]}
