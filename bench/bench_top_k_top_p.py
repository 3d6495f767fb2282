"""Top-k / top-p filtering (kernels/top_k_top_p.py: radix-select thresholds) against the
sort the sampler ran before, fp32 processed logits.

CUDA only. Run from the repo root:  PYTHONPATH=$PWD python bench/bench_top_k_top_p.py

Llama-3's vocabulary (128,256), N rows in (1, 64, 256), two settings: top_p 0.9, and top_k
50 with top_p 0.95; logits randn * 4 / 0.8 (temperature 0.8) and a peaked variant (one row
in ten of its tokens 8 higher: a model that is sure of a few tokens). For each: check the
kernel's kept tokens against the reference's (exit non-zero if a row differs by a token whose
mass above is not within 1e-4 of top_p: only rounding may move a boundary), then time with
triton.testing.do_bench (median) the launcher and the reference (sort, softmax, cumsum;
torch.compile of it fails in Inductor on torch 2.11, so it is not a peer here); then the whole `Sampler` on N such sequences, host time
included (wall per call, CUDA-synchronized). Table last; $OUT gets .md and .json.
"""
import statistics
import sys
import time

import torch
from triton.testing import do_bench

from bench.report import markdown, report
from trtllm.kernels.top_k_top_p import top_k_top_p_ref, top_k_top_p_triton
from trtllm.runtime.sampler import Sampler, SamplingBatch
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

V = 128256
ROWS = (1, 64, 256)
SETTINGS = {"top_p 0.9": (V, 0.9), "top_k 50, top_p 0.95": (50, 0.95)}


def operands(n: int, peaked: bool, k: int, p: float, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, V, generator=g, device="cuda") * 4 / 0.8
    if peaked:
        x += 8.0 * (torch.rand(n, V, generator=g, device="cuda") < 1e-4)
    return x, torch.full((n,), k, device="cuda"), torch.full((n,), p, device="cuda")


def boundary_only(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> bool:
    """Rows whose kept sets differ differ only by tokens at the top-p boundary (float64)."""
    for i in (got.isfinite() != want.isfinite()).any(-1).nonzero()[:, 0].tolist():
        kept_k = torch.isfinite(top_k_top_p_ref(x[i:i + 1], k[i:i + 1], torch.ones_like(p[i:i + 1])))[0]
        probs = torch.where(kept_k, x[i].double(), float("-inf")).softmax(-1)
        differ = (got[i].isfinite() != want[i].isfinite()).nonzero()[:, 0]
        above = torch.stack([probs[probs > probs[j]].sum() for j in differ])
        if ((above - p[i]).abs() > 1e-4).any():
            return False
    return True


def sampler_wall_us(n: int, k: int, p: float) -> float:
    params = SamplingParams(temperature=0.8, top_k=0 if k == V else k, top_p=p, seed=1, max_tokens=16)
    seqs = [Sequence(f"r{i}", [1, 2, 3], params) for i in range(n)]
    logits = (torch.randn(n, V, device="cuda") * 4).bfloat16()
    sampler, walls = Sampler(), []
    for _ in range(30):
        torch.cuda.synchronize()
        t = time.perf_counter()
        sampler(logits, SamplingBatch.build(seqs, V, "cuda", [2])).token_ids.tolist()
        walls.append((time.perf_counter() - t) * 1e6)
    return statistics.median(walls[5:])


def main() -> int:
    rows, failed = [], False
    for setting, (k, p) in SETTINGS.items():
        for n in ROWS:
            for peaked in (False, True):
                ops = operands(n, peaked, k, p, seed=n + peaked)
                got, want = top_k_top_p_triton(*ops), top_k_top_p_ref(*ops)
                rows_differ = int((got.isfinite() != want.isfinite()).any(-1).sum())
                ok = boundary_only(got, want, *ops) and torch.equal(got[got.isfinite()], ops[0][got.isfinite()])
                failed |= not ok
                has = dict(has_top_k=k < V, has_top_p=p < 1.0)  # as the sampler calls it: no sync
                ms = {name: do_bench(lambda f=f, ops=ops: f(*ops), return_mode="median")
                      for name, f in (("kernel", lambda *a, has=has: top_k_top_p_triton(*a, **has)),
                                      ("torch", top_k_top_p_ref))}
                rows.append({"setting": setting, "logits": "peaked" if peaked else "randn", "rows": n,
                             "kept / row": f"{got.isfinite().sum().item() / n:.0f}",
                             "rows differing (boundary)": rows_differ, "check": "ok" if ok else "FAILED",
                             "kernel us": f"{ms['kernel'] * 1e3:.1f}", "sort (torch) us": f"{ms['torch'] * 1e3:.1f}",
                             "x torch": f"{ms['torch'] / ms['kernel']:.1f}",
                             "Sampler wall us": f"{sampler_wall_us(n, k, p):.0f}" if not peaked else ""})
    report("bench_top_k_top_p", "## top_k_top_p (V = 128,256, fp32 processed logits)\n" + markdown(rows),
           {"rows": rows, "device": torch.cuda.get_device_name()})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
