"""lm-evaluation-harness (package `lm-eval`, the `[eval]` extra) driving our engine through
its `LM` interface.

    lm = TrtllmLM(scorer)                     # an lm_eval.api.model.LM
    results = run_lm_eval(scorer, ["my_task"], include_path="tasks/", num_fewshot=None, limit=None)

- `loglikelihood`: (context, continuation) -> (log-likelihood, is_greedy), one batched
  prompt-logprob pass (`Scorer.loglikelihoods`). Contexts are encoded as `LLM.generate`
  encodes a prompt, with the tokenizer's bos; lm-eval's HF backend leaves bos out unless
  `add_bos_token=True`, so figures can differ slightly from that backend's.
- `loglikelihood_rolling`: lm-eval's own disjoint rolling windows (`get_rolling_token_windows`,
  the prefix token bos or eos), each window scored as a log-likelihood.
- `generate_until`: greedy generation, stopped at the request's `until` strings or
  `max_gen_toks`. Sampling (`do_sample`, temperature > 0) is refused by name.

Nothing is downloaded: the hub and datasets are put offline before lm-eval is imported,
so a task is one whose data is local (`--include_path` YAMLs reading local files, e.g.
`dataset_path: json` with `dataset_kwargs: {data_files: ...}`), or already in the
datasets cache. Sequences longer than the engine scores are refused before any runs.
Standard errors: lm-eval's (closed form for means; `bootstrap_iters` resamples, in this
process, for the metrics it bootstraps).
"""
from __future__ import annotations

import os

from trtllm.eval.scorer import EvalInputError, Scorer

# the generation options a greedy request may carry (lm-eval task YAMLs set them freely)
_GREEDY_NEUTRAL = {"do_sample", "temperature", "top_p", "top_k"}


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # lm-eval bootstraps some stderrs in a forked pool: no fork while the engine's thread runs
    os.environ.setdefault("DISABLE_MULTIPROC", "1")


def lm_class():
    """TrtllmLM, built on first use: lm-eval is an optional dependency."""
    _offline()
    try:
        from lm_eval import utils
        from lm_eval.api.model import LM
    except ImportError:
        raise EvalInputError("the lm-eval task needs lm-evaluation-harness: pip install 'trtllm[eval]'") from None

    class TrtllmLM(LM):
        def __init__(self, scorer: Scorer, max_gen_tokens: int = 256):
            super().__init__()
            self.scorer, self.max_gen_tokens = scorer, max_gen_tokens

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [self.scorer.encode_pair(*r.args) for r in requests]
            return self.scorer.loglikelihoods(pairs)

        def loglikelihood_rolling(self, requests) -> list[float]:
            prefix, length = self.scorer.prefix_token(), self.scorer.max_len - 1
            pairs, owners = [], []
            for i, r in enumerate(requests):
                (text,) = r.args
                windows = utils.get_rolling_token_windows(self.scorer.encode(text, special=False), prefix, length, 1)
                for ctx, cont in map(utils.make_disjoint_window, windows):
                    pairs.append((ctx, cont))
                    owners.append(i)
            totals = [0.0] * len(requests)
            for i, (ll, _) in zip(owners, self.scorer.loglikelihoods(pairs)):
                totals[i] += ll
            return totals

        def generate_until(self, requests) -> list[str]:
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(self._generation(r.args[1]), []).append(i)
            texts: list[str] = [""] * len(requests)
            for (until, max_tokens), rows in groups.items():
                prompts = [self.scorer.encode(requests[i].args[0]) for i in rows]
                for i, text in zip(rows, self.scorer.generate(prompts, list(until), max_tokens)):
                    texts[i] = text
            return texts

        def _generation(self, kwargs: dict) -> tuple[tuple[str, ...], int]:
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise EvalInputError(f"generate_until with sampling ({kwargs}): only greedy generation is supported")
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_tokens))
            unknown = sorted(set(kwargs) - _GREEDY_NEUTRAL)
            if unknown:
                raise EvalInputError(f"generate_until: unsupported generation options {unknown}")
            return until, max_tokens

    return TrtllmLM


def run_lm_eval(scorer: Scorer, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | float | None = None, max_gen_tokens: int = 256, include_defaults: bool = True,
                bootstrap_iters: int = 1000) -> dict:
    """lm_eval.simple_evaluate on our engine: {"results": per task figures, "n-samples", "versions",
    "n-shot"} (lm-eval's keys)."""
    lm = lm_class()(scorer, max_gen_tokens)
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise EvalInputError(f"--include_path {include_path!r} is not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    missing = [t for t in tasks if t not in manager.all_subtasks and t not in manager.all_groups
               and t not in manager.all_tags]
    if missing:
        local = sorted(TaskManager(include_path=include_path, include_defaults=False).all_subtasks) \
            if include_path else []
        raise EvalInputError(f"lm-eval task(s) not found: {', '.join(missing)}; tasks in --include_path: "
                             f"{', '.join(local) or 'none'} (built-in: `lm-eval ls tasks`)")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters)
    return {key: out[key] for key in ("results", "n-samples", "versions", "n-shot") if key in out}
