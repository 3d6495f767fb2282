"""Evaluation on our engine (`trtllm-eval`, trtllm/cli/eval.py): one concern a module.

    scorer.py           the engine as evaluation asks of it (log-likelihoods from prompt logprobs, greedy generation)
    perplexity.py       perplexity and bits per byte of a long text, in sliding windows
    datasets.py         rows of local JSON / JSONL / parquet files, errors naming the row
    tasks.py            multiple-choice tasks (MMLU, HellaSwag, ARC, the demo model's) from their published layouts
    multiple_choice.py  scoring them: acc, acc_norm, standard errors
    gsm8k.py            GSM8K: greedy generation, exact match of the final number
    lm_eval_adapter.py  lm-evaluation-harness driving the engine through its LM interface
    report.py           the table and the JSON report (configuration, versions, commit)
    metrics.py          means and their standard errors
"""
