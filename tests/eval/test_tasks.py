"""The local-file tasks end to end on tiny dataset files in each published layout: rows read
(JSONL, JSON, parquet), prompts as lm-eval builds them, acc / acc_norm equal to what HF's
log-likelihoods of the same requests give, GSM8K's answer extraction; malformed rows
refused with their line or row number."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.eval.conftest import hf_loglikelihood
from trtllm.eval import gsm8k
from trtllm.eval.datasets import read_rows
from trtllm.eval.multiple_choice import evaluate_mc, fewshot_for, prompt
from trtllm.eval.scorer import EvalInputError
from trtllm.eval.tasks import ARC, DEMO_MC, HELLASWAG, MC_TASKS, MMLU

MMLU_ROWS = [
    {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "The fox is", "subject": "elementary_mathematics", "choices": ["quick", "lazy", "brown", "red"],
     "answer": 2},
    {"question": "Hello there", "subject": "world_religions", "choices": ["world", "dog", "café", "fox"], "answer": 0},
]
HELLASWAG_ROWS = [
    {"activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he", "ctx": "unused",
     "endings": ["stirs it [title] well.", "jumps over the lazy dog.", "says hello.", "eats the bowl."], "label": "0"},
    {"ctx": "The quick brown fox", "endings": [" jumps.", "sleeps on the dog.", "runs.", "is lazy."], "label": 2},
]
ARC_JSONL = [
    {"id": "a", "question": {"stem": "Which is a color?", "choices": [{"text": "brown", "label": "A"},
                                                                     {"text": "dog", "label": "B"},
                                                                     {"text": "fox", "label": "C"}]},
     "answerKey": "A"},
    {"id": "b", "question": {"stem": "Hello?", "choices": [{"text": "world", "label": "1"},
                                                          {"text": "there", "label": "2"}]}, "answerKey": "2"},
]
ARC_PARQUET = [{"id": "a", "question": "Which is a color?",
                "choices": {"text": ["brown", "dog", "fox"], "label": ["A", "B", "C"]}, "answerKey": "A"}]
GSM_ROWS = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "What is 1,000 + 234?", "answer": "It is 1,234.\n#### 1,234"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected_acc(scorer, hf, task, docs, fewshot=0):
    """acc, acc_norm from HF's log-likelihoods of the same (context, choice) token pairs."""
    hits, hits_norm = [], []
    for doc in docs:
        context = prompt(task, doc, fewshot_for(doc, docs, fewshot))
        lls = [hf_loglikelihood(hf, *scorer.encode_pair(context, task.delimiter + c)) for c in doc.choices]
        norm = [v / len(c) for v, c in zip(lls, doc.choices)]
        hits.append(lls.index(max(lls)) == doc.gold)
        hits_norm.append(norm.index(max(norm)) == doc.gold)
    return sum(hits) / len(hits), sum(hits_norm) / len(hits_norm)


def test_mmlu_prompt_and_accuracy(tmp_path, scorer, hf):
    pq.write_table(pa.Table.from_pylist(MMLU_ROWS), tmp_path / "test.parquet")  # cais/mmlu's layout
    docs = MMLU.read(read_rows(tmp_path / "test.parquet"))
    assert [d.gold for d in docs] == [1, 2, 0]
    (tmp_path / "letters.json").write_text(json.dumps({"test": [dict(MMLU_ROWS[1], answer="C")]}))
    assert MMLU.read(read_rows(tmp_path / "letters.json")) == docs[1:2]  # a letter answer, a wrapped list
    assert prompt(MMLU, docs[0], []) == ("The following are multiple choice questions (with answers) about elementary "
                                         "mathematics.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert fewshot_for(docs[0], docs, 1) == [docs[1]]  # same subject, never the doc itself
    results = evaluate_mc(scorer, MMLU, docs[:2], num_fewshot=1)
    acc, _ = expected_acc(scorer, hf, MMLU, docs[:2], fewshot=1)
    assert results["acc"] == acc and "acc_norm" not in results and results["n"] == 2
    assert set(results["groups"]) == {"elementary_mathematics"}
    with pytest.raises(EvalInputError, match="only 0 other examples of group 'world_religions'"):
        evaluate_mc(scorer, MMLU, docs, num_fewshot=1)


def test_hellaswag_preprocessing_and_accuracy(tmp_path, scorer, hf):
    docs = HELLASWAG.read(read_rows(write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG_ROWS)))
    assert docs[0].context == "Cooking: A man cracks an egg. He"
    assert docs[0].choices[0] == "stirs it. well." and docs[1].gold == 2
    results = evaluate_mc(scorer, HELLASWAG, docs)
    assert (results["acc"], results["acc_norm"]) == expected_acc(scorer, hf, HELLASWAG, docs)
    assert results["acc_stderr"] is not None


def test_arc_both_layouts(tmp_path, scorer, hf):
    docs = ARC.read(read_rows(write_jsonl(tmp_path / "arc.jsonl", ARC_JSONL)))
    pq.write_table(pa.Table.from_pylist(ARC_PARQUET), tmp_path / "arc.parquet")
    assert ARC.read(read_rows(tmp_path / "arc.parquet")) == docs[:1]
    assert docs[0].context == "Question: Which is a color?\nAnswer:" and docs[1].gold == 1
    results = evaluate_mc(scorer, ARC, docs)
    assert (results["acc"], results["acc_norm"]) == expected_acc(scorer, hf, ARC, docs)


def test_demo_mc_shipped_file_reads():
    from trtllm.demo import DEMO_MODEL_DIR

    docs = DEMO_MC.read(read_rows(DEMO_MODEL_DIR / "eval_mc.jsonl"))
    assert len(docs) == 200 and all(len(d.choices) == 4 for d in docs)
    assert all(not d.context.endswith(" ") and all(c.startswith(" ") for c in d.choices) for d in docs)


def test_gsm8k_extraction_and_end_to_end(tmp_path, scorer):
    assert gsm8k.extract("so 3 + 4 = 7.\n#### 7") == ("7", "7")
    assert gsm8k.extract("The answer is $1,234.") == (None, "1234")
    assert gsm8k.extract("no number") == (None, None)
    docs = gsm8k.read_docs(read_rows(write_jsonl(tmp_path / "gsm8k.jsonl", GSM_ROWS)))
    assert [d.target for d in docs] == ["7", "1234"]
    assert gsm8k.prompt(docs[1], docs[:1]) == ("Question: Tom has 3 apples and buys 4. How many?\nAnswer: 3 + 4 = 7\n"
                                               "#### 7\n\nQuestion: What is 1,000 + 234?\nAnswer:")
    results = gsm8k.evaluate_gsm8k(scorer, docs, num_fewshot=1, max_gen_tokens=8)
    generations = [s["generation"] for s in results["samples"]]
    expected = [gsm8k.extract(g)[1] == d.target for g, d in zip(generations, docs)]
    assert results["exact_match,flexible-extract"] == sum(expected) / 2 and results["n"] == 2
    assert all(g and "Question:" not in g for g in generations)  # generated, cut at the stop string


@pytest.mark.parametrize("content, error", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}\nnot json\n', r"mmlu.jsonl line 2: not valid JSON"),
    ('\n{"question": "q", "answer": 0}\n', r"mmlu.jsonl line 2: no 'choices' field \(expected question, choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}\n', r"line 1: answer 5 is not one of the 2 choices"),
    ('{"question": "q", "choices": "ab", "answer": 0}\n', r"line 1: 'choices' must be list, got str"),
    ('["q"]\n', r"line 1: a row must be a JSON object, got list"),
    ('', r"holds no rows"),
])
def test_malformed_rows_are_refused_with_their_line(tmp_path, content, error):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(content)
    with pytest.raises(EvalInputError, match=error):
        MMLU.read(read_rows(path))


def test_other_malformed_inputs(tmp_path):
    with pytest.raises(EvalInputError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "rows.json").write_text('[{"ctx": "a", "endings": ["b", "c"], "label": ""}]')
    with pytest.raises(EvalInputError, match="rows.json row 1: 'label' is empty"):
        HELLASWAG.read(read_rows(tmp_path / "rows.json"))
    write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "7"}])
    with pytest.raises(EvalInputError, match=r"gsm.jsonl line 1: 'answer' has no final '#### N' line"):
        gsm8k.read_docs(read_rows(tmp_path / "gsm.jsonl"))
    write_jsonl(tmp_path / "arc.jsonl", [dict(ARC_JSONL[0], answerKey="E")])
    with pytest.raises(EvalInputError, match=r"answerKey 'E' is not one of the labels \['A', 'B', 'C'\]"):
        ARC.read(read_rows(tmp_path / "arc.jsonl"))
    assert set(MC_TASKS) == {"mmlu", "hellaswag", "arc", "demo-mc"}


def test_demo_mc_file_is_made_as_tools_make_demo_eval_says():
    """Without the corpus (fetched by apt), the part that can be checked: the held-out split
    begins with heldout_sample.txt's entries, so the first questions are those entries that
    pass the script's filter, cut as it cuts them."""
    import importlib.util

    from trtllm.demo import DEMO_MODEL_DIR, read_entries

    spec = importlib.util.spec_from_file_location("make_demo_eval", DEMO_MODEL_DIR.parents[1] / "tools" /
                                                  "make_demo_eval.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    fit = [e for e in read_entries(DEMO_MODEL_DIR / "heldout_sample.txt")[:-1]  # the last may be cut short
           if tool.MIN_CHARS <= len(e) <= tool.MAX_CHARS and len(e.split()) >= tool.MIN_WORDS]
    docs = DEMO_MC.read(read_rows(DEMO_MODEL_DIR / "eval_mc.jsonl"))
    assert len(fit) >= 5
    for entry, doc in zip(fit, docs):
        assert (doc.context, doc.choices[doc.gold]) == tool.cut(entry)
