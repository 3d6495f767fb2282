"""Memory-bound ops (rms_norm, fused_add_rms_norm, rotary, silu_mul) vs their peers, bf16.

CUDA only. Run from the repo root:  PYTHONPATH=$PWD python bench/bench_elementwise.py

Llama-3-8B shapes, T tokens in (1, 64, 4096, 16384):
  rms_norm / fused_add_rms_norm  x, residual [T, 4096]
  rotary                         x [1, 32, T, 128], cos/sin [1, T, 128]
  silu_mul                       gate, up = the two halves of one [T, 2 * 14336] gate_up

For each case: check ours against the fp32 reference (`<op>_ref`) on fresh random inputs
(rel. error = ||ours - ref|| / ||ref||; exit non-zero over 1e-2), then time with
triton.testing.do_bench (median, L2 flushed between runs) ours, the HF-style eager torch
function in bf16, and torch.compile of that function. GB/s = (bytes of every input read
+ every output written, each counted once) / time. A large device-to-device copy gives
the ceiling. The markdown table is printed last; if $OUT is set, the table and a JSON
record are also written there.
"""
import os
import sys

import torch
import triton

from bench.report import copy_ceiling_tbs, report
from trtllm.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from trtllm.kernels.rotary import rope_cos_sin, rope_inv_freq, rotary, rotary_ref
from trtllm.kernels.silu_mul import silu_mul, silu_mul_ref

TOKENS = (1, 64, 4096, 16384)
HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 128, 14336
EPS = 1e-5
DTYPE = torch.bfloat16
DEVICE = "cuda"
MAX_REL_ERR = 1e-2
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


# --- the peers: the ops written the HF transformers way, in the model dtype -------------
def rms_norm_eager(x, weight):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_eager(x, residual, weight):
    summed = x + residual
    return rms_norm_eager(summed, weight), summed


def rotary_eager(x, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def silu_mul_eager(gate, up):
    return torch.nn.functional.silu(gate) * up


# --- cases: (name, shape label, inputs, ours, reference, eager) ------------------------
def _cases(tokens):
    dev = DEVICE
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=DTYPE)
    residual = torch.randn(tokens, HIDDEN, device=dev, dtype=DTYPE)
    weight = (1 + 0.1 * torch.randn(HIDDEN, device=dev)).to(DTYPE)
    yield ("rms_norm", f"[{tokens}, {HIDDEN}]", (x, weight),
           lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_ref(x, w, EPS), rms_norm_eager)
    yield ("fused_add_rms_norm", f"[{tokens}, {HIDDEN}]", (x, residual, weight),
           lambda x, r, w: fused_add_rms_norm(x, r, w, EPS),
           lambda x, r, w: fused_add_rms_norm_ref(x, r, w, EPS), fused_add_rms_norm_eager)

    q = torch.randn(1, HEADS, tokens, HEAD_DIM, device=dev, dtype=DTYPE)
    positions = torch.randint(0, 8192, (1, tokens), device=dev)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(HEAD_DIM, 500000.0, LLAMA3_SCALING), DTYPE)
    yield ("rotary", f"[1, {HEADS}, {tokens}, {HEAD_DIM}]", (q, cos, sin),
           lambda x, c, s: rotary(x, c, s, False), lambda x, c, s: rotary_ref(x, c, s, False),
           rotary_eager)

    gate_up = torch.randn(tokens, 2 * INTERMEDIATE, device=dev, dtype=DTYPE)
    gate, up = gate_up[:, :INTERMEDIATE], gate_up[:, INTERMEDIATE:]
    yield ("silu_mul", f"[{tokens}, {INTERMEDIATE}]", (gate, up), silu_mul, silu_mul_ref,
           silu_mul_eager)


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _rel_err(outs, refs):
    num = sum((o.float() - r.float()).norm() ** 2 for o, r in zip(outs, refs)) ** 0.5
    den = sum(r.float().norm() ** 2 for r in refs) ** 0.5
    return (num / den).item()


def _time_ms(fn, args):
    return triton.testing.do_bench(lambda: fn(*args), return_mode="median")


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_elementwise.py needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter would time the CPU")
    for knob in ("recompile_limit", "cache_size_limit"):  # one specialization per shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    torch.manual_seed(0)
    ceiling = copy_ceiling_tbs(DEVICE) * 1e3  # GB/s
    print(f"device-to-device copy ceiling: {ceiling:.0f} GB/s", flush=True)

    compiled = {}
    rows, failures = [], []
    for tokens in TOKENS:
        for name, shape, args, ours, reference, eager in _cases(tokens):
            outs, refs = _outputs(ours(*args)), _outputs(reference(*args))
            err = _rel_err(outs, refs)
            mismatch = sum((o != r).sum().item() for o, r in zip(outs, refs)) / sum(r.numel() for r in refs)
            eager_err = _rel_err(_outputs(eager(*args)), refs)
            if not err <= MAX_REL_ERR:
                failures.append(f"{name} {shape}: rel err {err:.2e} > {MAX_REL_ERR:.0e}")
                print(f"FAIL {failures[-1]}", flush=True)
            if name not in compiled:
                compiled[name] = torch.compile(eager, dynamic=False)
            fn_compiled = compiled[name]
            nbytes = _nbytes(args) + _nbytes(outs)
            row = dict(op=name, shape=shape, bytes=nbytes, rel_err=err, mismatch=mismatch,
                       eager_rel_err=eager_err)
            for label, fn in (("ours", ours), ("eager", eager), ("compile", fn_compiled)):
                ms = _time_ms(fn, args)
                row[f"{label}_us"] = ms * 1e3
                row[f"{label}_gbps"] = nbytes / (ms * 1e-3) / 1e9
            rows.append(row)
            print(f"{name:<20} {shape:<20} rel err {err:.1e} (bits differ {mismatch:.1%}; "
                  f"eager {eager_err:.1e})  ours {row['ours_gbps']:.0f} GB/s  "
                  f"eager {row['eager_gbps']:.0f}  compile {row['compile_gbps']:.0f}", flush=True)
            del outs, refs

    table = [
        f"device-to-device copy ceiling: {ceiling:.0f} GB/s ({torch.cuda.get_device_name()})",
        "",
        "| op | shape | ours µs | ours GB/s | % copy | eager GB/s | compile GB/s "
        "| ours / compile | rel err | bits ≠ ref |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['op']} | {r['shape']} | {r['ours_us']:.1f} | {r['ours_gbps']:.0f} "
            f"| {100 * r['ours_gbps'] / ceiling:.0f}% | {r['eager_gbps']:.0f} | {r['compile_gbps']:.0f} "
            f"| {r['compile_us'] / r['ours_us']:.2f}x | {r['rel_err']:.1e} | {r['mismatch']:.1%} |"
        )
    report("bench_elementwise", "\n".join(table), dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                             triton=triton.__version__, copy_ceiling_gbps=ceiling, rows=rows,
                                                             failures=failures))
    if failures:
        sys.exit("ACCURACY FAILURES:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
