"""Write the demo model's multiple-choice task, trtllm/demo_model/eval_mc.jsonl, from its corpus.

    tools/fetch_corpus.sh                       # data/fortunes.txt (Debian's fortunes, as trained on)
    python tools/make_demo_eval.py [--corpus data/fortunes.txt] [--out trtllm/demo_model/eval_mc.jsonl]

"Which ending completes this fortune?": held-out fortunes only (the entries the demo
model never saw: tools/train_demo_model.py's seeded 90/5/5 split by entry, seed 1234,
re-made here and checked against the shipped heldout_sample.txt). Each fortune of 80-300
characters and at least 12 words is cut at the space nearest its middle; the first half is
the context, the second half (with its leading space) the right choice, and the second
halves of three other such fortunes, drawn with a seeded generator, the wrong ones. The
first --num questions are kept. Deterministic: the same corpus (sha256 checked against
corpus.json) gives the same file byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "trtllm" / "demo_model"
SEED = 1234            # the training split's seed (training.json "seed")
MIN_CHARS, MAX_CHARS, MIN_WORDS = 80, 300, 12


def split_entries(entries: list[str], seed: int) -> tuple[list[str], list[str], list[str]]:
    """tools/train_demo_model.py's split, unchanged: (train, validation, held-out), 90/5/5."""
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(0.05 * len(entries)))
    heldout = [entries[i] for i in order[:n_eval]]
    val = [entries[i] for i in order[n_eval: 2 * n_eval]]
    train = [entries[i] for i in order[2 * n_eval:]]
    return train, val, heldout


def cut(entry: str) -> tuple[str, str]:
    """(context, ending): split at the space nearest the middle; the ending keeps the space."""
    middle = len(entry) // 2
    spaces = [i for i, ch in enumerate(entry) if ch == " "]
    at = min(spaces, key=lambda i: (abs(i - middle), i))
    return entry[:at], entry[at:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=REPO / "data" / "fortunes.txt")
    ap.add_argument("--out", type=Path, default=DEMO / "eval_mc.jsonl")
    ap.add_argument("--num", type=int, default=200)
    args = ap.parse_args(argv)

    raw = args.corpus.read_bytes()
    expected = json.loads((DEMO / "corpus.json").read_text())["sha256"]
    if hashlib.sha256(raw).hexdigest() != expected:
        raise SystemExit(f"{args.corpus}: sha256 differs from corpus.json's {expected} (another corpus)")
    text = raw.decode("utf-8")
    entries = [e.strip() for e in text.replace("\r\n", "\n").split("\n\n") if e.strip()]
    _, _, heldout = split_entries(entries, SEED)
    sample = (DEMO / "heldout_sample.txt").read_text(encoding="utf-8")
    if not sample.startswith("\n\n".join(heldout[:3])):
        raise SystemExit("the re-made held-out split does not start with heldout_sample.txt's entries")

    fit = [e for e in heldout if MIN_CHARS <= len(e) <= MAX_CHARS and len(e.split()) >= MIN_WORDS and " " in e]
    pairs = [cut(e) for e in fit]
    rng = random.Random(SEED)
    rows = []
    for i, (context, ending) in enumerate(pairs[: args.num]):
        others = rng.sample([j for j in range(len(pairs)) if j != i], 3)
        choices = [ending] + [pairs[j][1] for j in others]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "label": choices.index(ending)})
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{args.out}: {len(rows)} questions from {len(fit)} held-out fortunes of {len(heldout)} "
          f"({args.out.stat().st_size:,} bytes, sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()})")


if __name__ == "__main__":
    main()
