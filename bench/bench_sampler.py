"""The sampler's choice (kernels/sample_rows.py) against its torch reference, bf16 logits.

CUDA only. Run from the repo root:  PYTHONPATH=$PWD python bench/bench_sampler.py

Llama-3's vocabulary (128,256), N rows in (1, 64, 256), every third row greedy, the others
at temperatures in [0.2, 1.7). For each N: check the kernel against `sample_rows_ref` on
fresh random logits (the same tokens, logprobs within 1e-4, the same finite flags; exit
non-zero otherwise), then time with triton.testing.do_bench (median) the kernel, the
reference (the torch sampler's temperature path before the kernel: ~120 launches) and
torch.compile of the reference. GB/s = the logits read once / time; the copy ceiling
beside. Then the whole `Sampler` on a batch of N plain sampled sequences, host time
included (wall per call, CUDA-synchronized). Table last; $OUT gets .md and .json.
"""
import statistics
import sys
import time

import torch
from triton.testing import do_bench

from bench.report import copy_ceiling_tbs, markdown, report
from trtllm.kernels.sample_rows import sample_rows, sample_rows_ref, sample_rows_triton
from trtllm.runtime.sampler import Sampler, SamplingBatch
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

V = 128256
ROWS = (1, 64, 256)


def operands(n: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n, V, generator=g, device="cuda") * 4).bfloat16()
    greedy = torch.arange(n, device="cuda") % 3 == 0
    temperature = torch.where(greedy, 1.0, torch.rand(n, generator=g, device="cuda") * 1.5 + 0.2)
    seeds = torch.randint(0, 2**62, (n,), generator=g, device="cuda")
    index = torch.zeros(n, dtype=torch.int64, device="cuda")
    step = torch.randint(0, 4000, (n,), generator=g, device="cuda")
    return logits, temperature, greedy, seeds, index, step


def sampler_wall_us(n: int) -> float:
    """The Sampler on n plain sampled sequences (SamplingBatch.build included), median wall."""
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=16)
    seqs = [Sequence(f"r{i}", [1, 2, 3], params) for i in range(n)]
    logits = torch.randn(n, V, device="cuda").bfloat16()
    sampler, walls = Sampler(), []
    for _ in range(30):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = sampler(logits, SamplingBatch.build(seqs, V, "cuda", [2]))
        out.token_ids.tolist()
        walls.append((time.perf_counter() - t) * 1e6)
    return statistics.median(walls[5:])


def main() -> int:
    ceiling = copy_ceiling_tbs()
    compiled_ref = torch.compile(sample_rows_ref)
    rows, failed = [], False
    for n in ROWS:
        ops = operands(n, seed=n)
        (tok, lp, fin), (rtok, rlp, rfin) = sample_rows(*ops), sample_rows_ref(*ops)
        same = (tok == rtok).float().mean().item()
        lp_err = (lp - rlp).abs().max().item()
        ok = same == 1.0 and lp_err < 1e-4 and torch.equal(fin, rfin)
        failed |= not ok
        ms = {name: do_bench(lambda f=f, ops=ops: f(*ops), return_mode="median")
              for name, f in (("kernel", sample_rows_triton), ("op", sample_rows), ("torch", sample_rows_ref),
                                 ("compiled", compiled_ref))}
        gbs = n * V * 2 / ms["kernel"] / 1e6
        rows.append({"rows": n, "same tokens": f"{same:.4f}", "logprob max err": f"{lp_err:.1e}",
                     "kernel us": f"{ms['kernel'] * 1e3:.1f}", "op us": f"{ms['op'] * 1e3:.1f}", "torch us": f"{ms['torch'] * 1e3:.1f}",
                     "torch.compile us": f"{ms['compiled'] * 1e3:.1f}",
                     "x torch": f"{ms['torch'] / ms['kernel']:.1f}", "kernel GB/s": f"{gbs:.0f}",
                     "copy GB/s": f"{ceiling * 1e3:.0f}", "Sampler wall us": f"{sampler_wall_us(n):.0f}"})
    report("bench_sampler", "## sample_rows (V = 128,256, bf16 logits)\n" + markdown(rows),
           {"rows": rows, "device": torch.cuda.get_device_name()})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
