"""lm-evaluation-harness drives the engine through its LM interface: simple_evaluate runs
local YAML tasks (written here, data in local JSONL: nothing downloaded) of each request
type, and the figures agree with our own tasks and with HF's model on the same requests."""
import json
import math

import pytest
import torch

from tests.eval.conftest import hf_loglikelihood
from trtllm.eval.lm_eval_adapter import lm_class, run_lm_eval
from trtllm.eval.multiple_choice import evaluate_mc
from trtllm.eval.scorer import EvalInputError
from trtllm.eval.tasks import ARC, MCDoc

MC = [{"question": "Which is a color?", "choices": ["brown", "dog", "fox"], "label": 0},
      {"question": "Hello", "choices": ["world", "there", "café crème"], "label": 1},
      {"question": "The quick brown fox jumps over the lazy", "choices": ["dog", "cat"], "label": 0}]
TEXTS = [{"text": "Hello world, hello there."},
         {"text": "The quick brown fox jumps over the lazy dog. " * 40}]  # longer than a window: rolls
GEN = [{"question": "The quick brown", "answer": "fox"}, {"question": "Hello world,", "answer": "hello"}]

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
{body}
"""
BODIES = {
    "tiny_mc": ("multiple_choice", 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\n'
                "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "tiny_rolling": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                     "  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
    "tiny_gen": ("generate_until", 'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                 'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 5\n  do_sample: false\n'
                 "metric_list:\n  - metric: exact_match\n"),
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in (("tiny_mc", MC), ("tiny_rolling", TEXTS), ("tiny_gen", GEN)):
        data = d / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        output_type, body = BODIES[name]
        (d / f"{name}.yaml").write_text(TASK.format(name=name, data=data, output_type=output_type, body=body))
    return d


def instance(request_type, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type, {}, args, 0)


def test_simple_evaluate_runs_every_request_type_on_our_lm(scorer, task_dir):
    out = run_lm_eval(scorer, ["tiny_mc", "tiny_rolling", "tiny_gen"], include_path=str(task_dir),
                      include_defaults=False)
    results = out["results"]
    # multiple choice: what our own ARC-format task gives on the same questions
    docs = [MCDoc(f"Question: {r['question']}\nAnswer:", r["choices"], r["label"]) for r in MC]
    ours = evaluate_mc(scorer, ARC, docs)
    assert results["tiny_mc"]["acc,none"] == pytest.approx(ours["acc"])
    assert results["tiny_mc"]["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert results["tiny_mc"]["acc_stderr,none"] == pytest.approx(ours["acc_stderr"])
    # rolling: bits per byte of the two texts from the adapter's own log-likelihoods
    lm = lm_class()(scorer)
    lls = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (r["text"],)) for r in TEXTS])
    n_bytes = sum(len(r["text"].encode()) for r in TEXTS)
    assert results["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(-sum(lls) / n_bytes / math.log(2))
    assert out["n-samples"]["tiny_gen"]["effective"] == 2 and "exact_match,none" in results["tiny_gen"]


def test_loglikelihood_and_rolling_equal_hf(scorer, hf):
    from lm_eval import utils

    lm = lm_class()(scorer)
    (ll, greedy), = lm.loglikelihood([instance("loglikelihood", ("Hello world,", " hello there"))])
    assert ll == pytest.approx(hf_loglikelihood(hf, *scorer.encode_pair("Hello world,", " hello there")), abs=1e-3)
    text = TEXTS[1]["text"]
    (rolled,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        scorer.encode(text, special=False), scorer.tokenizer.eos_token_id, scorer.max_len - 1, 1)))
    assert len(windows) > 1  # the text is longer than one window
    assert rolled == pytest.approx(sum(hf_loglikelihood(hf, c, x) for c, x in windows), abs=1e-2)


def test_generate_until_is_greedy_and_stops(scorer, hf):
    lm = lm_class()(scorer)
    texts = lm.generate_until([instance("generate_until", ("The quick brown", {"until": ["\n"], "max_gen_toks": 6})),
                               instance("generate_until", ("Hello", {"max_gen_toks": 3}))])
    prompt = scorer.encode("The quick brown")
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    expected = scorer.tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
    assert texts[0] == expected and len(texts) == 2
    with pytest.raises(EvalInputError, match="only greedy generation is supported"):
        lm.generate_until([instance("generate_until", ("Hi", {"do_sample": True, "temperature": 0.7}))])


def test_unknown_tasks_are_named(scorer, task_dir):
    with pytest.raises(EvalInputError, match=r"lm-eval task\(s\) not found: nope; tasks in --include_path: "
                                             r"tiny_gen, tiny_mc, tiny_rolling"):
        run_lm_eval(scorer, ["nope"], include_path=str(task_dir), include_defaults=False)
