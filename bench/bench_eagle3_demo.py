"""EAGLE-3 with a trained head: the demo model and the head shipped beside it
(trtllm/demo_model/eagle3, tools/train_eagle3_head.py), greedy, on the held-out sample's
entries as prompts (text the head never saw), against the same model without speculation.

    PYTHONPATH=$PWD python bench/bench_eagle3_demo.py [--head DIR] [--draft-len 4] [--new 64]

Per batch size: output tok/s with and without the head, the speed-up, the draft tokens'
acceptance rate and the acceptance length (tokens a verify step gains: accepted + 1), the
fraction of sequences token-identical to the plain run, and where one parts from it, how far
below the plain target's pick its token lies (the check, as bench/bench_speculative.py's: at
most MAX_DIVERGENCE_GAP nats, else exit 1; on a GPU in bf16, verify steps of k + 1 tokens round
differently from one-token decode steps, so near-ties flip: 2026-12-05 H200, the first run). The demo model is tiny (6 layers, hidden 256): its steps are
host-bound, so the speed-up here says little about a large target; the acceptance length is
the head's. Runs on the CPU or a GPU. Table last; JSON under $OUT when set.
"""
import argparse

import torch

from bench.bench_speculative import MAX_DIVERGENCE_GAP, divergence_gaps, run
from bench.report import markdown, report
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.demo import HELDOUT_SAMPLE, demo_model_path, read_entries
from trtllm.runtime.llm import LLM
from trtllm.runtime.speculative.config import EagleDecodingConfig
from trtllm.runtime.tokenizer import load_tokenizer


def make_llm(path, batch: int, **spec) -> LLM:
    return LLM(str(path), kv_cache_config=KvCacheConfig(max_tokens=batch * 256 + 512),
               build_config=BuildConfig(max_batch_size=batch, max_num_tokens=1024, max_seq_len=256), **spec)


def main():
    model = demo_model_path()
    ap = argparse.ArgumentParser()
    ap.add_argument("--head", default=str(model / "eagle3"))
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens: each held-out entry's first ones")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    tokenizer = load_tokenizer(str(model))
    entries = read_entries(model / HELDOUT_SAMPLE)
    prompts = [ids[:args.prompt] for ids in tokenizer(entries)["input_ids"] if len(ids) >= args.prompt]
    rows, record = [], {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                        "head": args.head, "draft_len": args.draft_len, "new": args.new, "rows": []}
    largest = max(args.batches)
    cfg = EagleDecodingConfig(max_draft_len=args.draft_len, speculative_model_dir=args.head)
    with make_llm(model, largest) as plain, make_llm(model, largest, speculative_config=cfg) as eagle:
        for b in args.batches:
            batch = prompts[:max(b, 16)] if b == 1 else prompts[:b]  # batch 1: 16 prompts one at a time
            expected, got, plain_s, spec_s, st = [], [], 0.0, 0.0, dict.fromkeys(
                ("spec_draft_tokens", "spec_accepted_tokens", "spec_verify_steps"), 0)
            for chunk in ([[p] for p in batch] if b == 1 else [batch]):
                e, s, _ = run(plain, chunk, args.new)
                g, t, spec = run(eagle, chunk, args.new)
                expected += e
                got += g
                plain_s += s
                spec_s += t
                st = {k: st[k] + spec[k] for k in st}
            gaps = divergence_gaps(plain, batch, expected, got)
            if gaps and max(gaps) > MAX_DIVERGENCE_GAP:
                raise SystemExit(f"batch {b}: a sequence with the EAGLE-3 head took a token {max(gaps):.3f} nats "
                                 f"below the plain target's pick (> {MAX_DIVERGENCE_GAP}): verification is wrong")
            drafts, accepted, steps = st["spec_draft_tokens"], st["spec_accepted_tokens"], st["spec_verify_steps"]
            n = len(batch) * args.new
            row = {"batch": b, "requests": len(batch), "draft len": args.draft_len,
                   "plain tok/s": f"{n / plain_s:,.1f}", "EAGLE-3 tok/s": f"{n / spec_s:,.1f}",
                   "speed-up": f"{plain_s / spec_s:.2f}x", "acceptance": f"{accepted / drafts:.1%}" if drafts else "-",
                   "acceptance length": f"{1 + accepted / steps:.2f}" if steps else "-",
                   "identical": f"{sum(a == e for a, e in zip(got, expected)) / len(expected):.2f}",
                   "max gap at a divergence": f"{max(gaps):.3f}" if gaps else "-"}
            rows.append(row)
            record["rows"].append(dict(row, plain_s=plain_s, spec_s=spec_s, draft_tokens=drafts,
                                       accepted_tokens=accepted, verify_steps=steps))
            print(row, flush=True)
    report("bench_eagle3_demo", markdown(rows), record)


if __name__ == "__main__":
    main()
