"""What does ALiBi (BLOOM, MPT, Falcon-RW) cost the paged attention kernels? Decode per layer
(graphed, 8 layers, read flush as bench_attention's decode rows) and prefill, at
bench_attention's shapes (bf16, Hq 32, Hkv 8, D 128, page 16), without ALiBi (the plain
kernels, the ALIBI constexpr off) and with BLOOM's slopes for 32 heads. Every case is first
checked against `paged_attention_ref`.

    PYTHONPATH=$PWD python bench/probes/alibi_cost.py
"""
import json
import os

import torch

import trtllm.kernels.paged_attention as pa
from bench.bench_attention import DEV, HQ, REL_TOL, graphed_layers, make_inputs, ms, ms_read_flush, rel_error
from trtllm.models.bloom import bloom_alibi_slopes

LAYERS = 8


def with_alibi(args, on: bool):
    slopes = torch.tensor(bloom_alibi_slopes(HQ), dtype=torch.float32, device=DEV)
    return [*args, None, slopes] if on else list(args)  # kv_scales None, then the slopes


def main():
    rows = []
    for batch, ctx in ((1, 2048), (8, 2048), (64, 2048)):
        base = make_inputs([(ctx - 1, 1)] * batch, seed=batch * 7 + ctx, layers=LAYERS)
        row = dict(case=f"decode b{batch} x {ctx}")
        for on in (False, True):
            args = with_alibi(base, on)
            err = rel_error(args)
            assert err < REL_TOL, (row, on, err)
            row[f"us_alibi_{on}"] = ms_read_flush(graphed_layers(args, LAYERS), reps=50) / LAYERS * 1e3
        rows.append(row)
    for tokens in (1024, 4096):
        base = make_inputs([(0, tokens)], seed=tokens)
        row = dict(case=f"prefill {tokens}")
        for on in (False, True):
            args = with_alibi(base, on)
            err = rel_error(args)
            assert err < REL_TOL, (row, on, err)
            row[f"us_alibi_{on}"] = ms(lambda a=args: pa.paged_attention(*a)) * 1e3
        rows.append(row)
    lines = ["| case | no ALiBi (us) | ALiBi (us) | ratio |", "|---|---:|---:|---:|"]
    for r in rows:
        a, b = r["us_alibi_False"], r["us_alibi_True"]
        lines.append(f"| {r['case']} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    table = "\n".join(lines)
    print(f"{torch.cuda.get_device_name()}\n{table}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "alibi_cost.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "alibi_cost.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
