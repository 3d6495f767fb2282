"""Multiple choice by log-likelihood: each choice's log-likelihood as the continuation of the
question, the highest wins.

    results = evaluate_mc(scorer, task, docs, fewshot_docs, num_fewshot)

acc: the choice of highest log-likelihood is the right one; acc_norm (where the task has
it): the same with each log-likelihood divided by the choice's length in characters
(lm-eval's acc_norm), which removes the bias towards short choices. Each with its
standard error; a figure per group (MMLU's subjects) besides.

Few-shot examples are the first `num_fewshot` docs of `fewshot_docs` (the task's own docs
when none are given) of the doc's group where it has one, never the doc itself:
deterministic, so two runs compare.
"""
from __future__ import annotations

from collections import defaultdict

from trtllm.eval.metrics import accuracy
from trtllm.eval.scorer import EvalInputError, Scorer
from trtllm.eval.tasks import MCDoc, MCTask


def fewshot_for(doc: MCDoc, pool: list[MCDoc], k: int) -> list[MCDoc]:
    if k == 0:
        return []
    same = [d for d in pool if d is not doc and (doc.group is None or d.group == doc.group)]
    if len(same) < k:
        where = f" of group {doc.group!r}" if doc.group else ""
        raise EvalInputError(f"--num_fewshot {k}: only {len(same)} other examples{where} to draw from "
                             "(give more with --fewshot_path)")
    return same[:k]


def prompt(task: MCTask, doc: MCDoc, shots: list[MCDoc]) -> str:
    examples = "".join(d.context + task.delimiter + d.choices[d.gold] + "\n\n" for d in shots)
    return task.description(doc) + examples + doc.context


def evaluate_mc(scorer: Scorer, task: MCTask, docs: list[MCDoc], fewshot_docs: list[MCDoc] | None = None,
                num_fewshot: int = 0) -> dict:
    pool = fewshot_docs if fewshot_docs is not None else docs
    pairs, owners = [], []
    for i, doc in enumerate(docs):
        context = prompt(task, doc, fewshot_for(doc, pool, num_fewshot))
        for choice in doc.choices:
            pairs.append(scorer.encode_pair(context, task.delimiter + choice))
            owners.append(i)
    lls = scorer.loglikelihoods(pairs)  # checks every length before any runs
    per_doc = defaultdict(list)
    for i, (ll, _) in zip(owners, lls):
        per_doc[i].append(ll)
    hits, hits_norm = [], []
    for i, doc in enumerate(docs):
        ll = per_doc[i]
        norm = [v / max(1, len(c)) for v, c in zip(ll, doc.choices)]
        hits.append(max(range(len(ll)), key=ll.__getitem__) == doc.gold)
        hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == doc.gold)
    results = {"n": len(docs), "num_fewshot": num_fewshot, **accuracy("acc", hits)}
    if task.acc_norm:
        results.update(accuracy("acc_norm", hits_norm))
    groups = sorted({d.group for d in docs if d.group is not None})
    if groups:
        results["groups"] = {g: {"n": sum(d.group == g for d in docs),
                                 **accuracy("acc", [h for h, d in zip(hits, docs) if d.group == g])}
                             for g in groups}
    return results
