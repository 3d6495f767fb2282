"""What does attention logit soft-capping (Gemma-2's attn_logit_softcapping) cost the paged
attention kernels? Decode per layer (graphed, 8 layers, read flush as bench_attention's
decode rows) and prefill, at bench_attention's shapes (bf16, Hq 32, Hkv 8, D 128, page 16),
with softcap 0 (none: the plain kernels) and 50 (Gemma-2's). Every case is first checked
against `paged_attention_ref`.

    PYTHONPATH=$PWD python bench/probes/softcap_cost.py
"""
import json
import os

import torch

import trtllm.kernels.paged_attention as pa
from bench.bench_attention import REL_TOL, graphed_layers, make_inputs, ms, ms_read_flush, rel_error

LAYERS = 8
SOFTCAP = 50.0


def with_softcap(args, softcap):
    a = list(args)
    a[12] = softcap
    return a


def main():
    rows = []
    for batch, ctx in ((1, 2048), (8, 2048), (64, 2048)):
        base = make_inputs([(ctx - 1, 1)] * batch, seed=batch * 7 + ctx, layers=LAYERS)
        base[0] = base[0] * 8  # logits of ~8 std: the cap bends them
        row = dict(case=f"decode b{batch} x {ctx}")
        for softcap in (0.0, SOFTCAP):
            args = with_softcap(base, softcap)
            err = rel_error(args)
            assert err < REL_TOL, (row, softcap, err)
            row[f"us_softcap_{softcap:g}"] = ms_read_flush(graphed_layers(args, LAYERS), reps=50) / LAYERS * 1e3
        rows.append(row)
    for tokens in (1024, 4096):
        base = make_inputs([(0, tokens)], seed=tokens)
        base[0] = base[0] * 8
        row = dict(case=f"prefill {tokens}")
        for softcap in (0.0, SOFTCAP):
            args = with_softcap(base, softcap)
            err = rel_error(args)
            assert err < REL_TOL, (row, softcap, err)
            row[f"us_softcap_{softcap:g}"] = ms(lambda a=args: pa.paged_attention(*a)) * 1e3
        rows.append(row)
    lines = ["| case | softcap 0 (us) | softcap 50 (us) | ratio |", "|---|---:|---:|---:|"]
    for r in rows:
        a, b = r["us_softcap_0"], r[f"us_softcap_{SOFTCAP:g}"]
        lines.append(f"| {r['case']} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    table = "\n".join(lines)
    print(f"{torch.cuda.get_device_name()}\n{table}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "softcap_cost.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "softcap_cost.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
