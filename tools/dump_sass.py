"""sm_90 SASS of the paged attention kernels, compiled here without a GPU.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python tools/dump_sass.py [--out DIR] [--check DIR] [config ...]

Compiles the decode kernel (and the prefill and cache-write kernels) for sm_90 with
Triton's own compiler, specialized as the launcher specializes them for the bench shapes
(bf16, Hq=32, Hkv=8, D=128, page 16: bench/bench_attention.py), disassembles them with
the nvdisasm Triton ships, and prints per configuration the instruction count, the
length of each loop (a backward branch: the decode K/V loop's steady-state tile) and a
hash of the instruction sequence without addresses, encodings or symbol names. A
refactor of a kernel leaves its SASS unchanged when the hashes match; --out DIR also
writes the normalized listings (DIR/<config>.sass), and --check DIR compares against
listings written so before (exit status 1 if any differs; `diff` the two files to see
where). Before/after a change: --out /tmp/before on the old tree, --check /tmp/before on
the new one. Needs no GPU, only the nvdisasm in triton/backends/nvidia/bin.
"""
import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build JITFunctions, not interpreted ones

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402

from trtllm.kernels.paged_attention.decode import _decode_kernel  # noqa: E402
from trtllm.kernels.paged_attention.prefill import _cache_write_kernel, _prefill_kernel  # noqa: E402
from trtllm.kernels.paged_attention.tiles import LOG2E  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
HQ, HKV, D, PAGE = 32, 8, 128, 16
G = HQ // HKV
BF16 = MockTensor(torch.bfloat16)  # a pointer argument 16-byte aligned, as torch allocates
I32, F32, I64 = MockTensor(torch.int32), MockTensor(torch.float32), MockTensor(torch.int64)
# a quantized KV cache's element (kernels/paged_attention/kv_quant.py): "" = the model's bf16
CACHE = {"": BF16, "fp8": MockTensor(torch.float8_e4m3fn), "int8": MockTensor(torch.int8)}
CACHE_STRIDES = (PAGE * HKV * D, HKV * D, D)  # one layer's [NB, PAGE, Hkv, D]


def decode_args(batch, ctx, splits, cluster, trace=False, softcap=0.0, kv_quant="", alibi=False, rope=False):
    """_decode_kernel's arguments as launch_decode passes them for batch x ctx (contiguous
    q/k/v/out rows as the bench makes them; num_tokens and window are not specialized;
    softcap is a constexpr, 0.0 = none; kv_quant "fp8" / "int8": a quantized cache; alibi:
    ALiBi slopes [Hq] fp32, else the output stands in for them, as the launcher passes; rope:
    q and the new keys rotated in the kernel, bf16 cos/sin rows of a token)."""
    return dict(
        q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, kc_ptr=CACHE[kv_quant], vc_ptr=CACHE[kv_quant],
        ks_ptr=F32 if kv_quant else BF16, vs_ptr=F32 if kv_quant else BF16, o_ptr=BF16, slot_ptr=I32,
        bt_ptr=I32, seq_lens_ptr=I32, qsl_ptr=I32,
        pm_ptr=F32 if splits > 1 and not cluster else BF16,
        pl_ptr=F32 if splits > 1 and not cluster else BF16,
        pacc_ptr=F32 if splits > 1 and not cluster else BF16,
        count_ptr=I32 if splits > 1 and not cluster else BF16,
        trace_ptr=I64 if trace else BF16, alibi_ptr=F32 if alibi else BF16, cos_ptr=BF16, sin_ptr=BF16,
        qk_scale=D ** -0.5 * LOG2E, window=0, num_tokens=batch,
        stride_qt=HQ * D, stride_qh=D, stride_kt=HKV * D, stride_kh=D, stride_vt=HKV * D, stride_vh=D,
        stride_ot=HQ * D, stride_oh=D, stride_bt=triton.cdiv(ctx, PAGE), stride_cos=D, stride_sin=D,
        STRIDE_CB=CACHE_STRIDES[0], STRIDE_CS=CACHE_STRIDES[1], STRIDE_CH=CACHE_STRIDES[2],
        G=G, HEAD_D=D, BLOCK_D=D, PAGE=PAGE, BLOCK_G=16, BLOCK_N=64, NUM_SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits), HKV=HKV, BLOCK_HKV=HKV, BLOCK_HQ=HQ,
        DOT_PREC="tf32", TRACE=trace, CLUSTER=cluster, OFF64=False, SOFTCAP=softcap, KV_QUANT=kv_quant,
        ALIBI=alibi, ROPE=rope, ROPE_INTERLEAVED=False,
    )


def prefill_args(tokens, block_m, softcap=0.0, kv_quant="", alibi=False):
    return dict(
        q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, kc_ptr=CACHE[kv_quant], vc_ptr=CACHE[kv_quant],
        ks_ptr=F32 if kv_quant else BF16, vs_ptr=F32 if kv_quant else BF16, o_ptr=BF16, bt_ptr=I32,
        seq_lens_ptr=I32, qsl_ptr=I32, alibi_ptr=F32 if alibi else BF16, qk_scale=D ** -0.5 * LOG2E, window=0,
        num_seqs=1,
        num_q_blocks=tokens // (block_m // G) + 1,
        stride_qt=HQ * D, stride_qh=D, stride_kt=HKV * D, stride_kh=D, stride_vt=HKV * D, stride_vh=D,
        stride_cb=CACHE_STRIDES[0], stride_cs=CACHE_STRIDES[1], stride_ch=CACHE_STRIDES[2],
        stride_ot=HQ * D, stride_oh=D, stride_bt=triton.cdiv(tokens, PAGE),
        G=G, HEAD_D=D, BLOCK_D=D, PAGE=PAGE, BLOCK_Q=block_m // G, BLOCK_M=block_m, SOFTCAP=softcap,
        KV_QUANT=kv_quant, ALIBI=alibi,
    )


def cache_write_args(kv_quant=""):
    return dict(
        k_ptr=BF16, v_ptr=BF16, kc_ptr=CACHE[kv_quant], vc_ptr=CACHE[kv_quant],
        ks_ptr=F32 if kv_quant else BF16, vs_ptr=F32 if kv_quant else BF16, slot_ptr=I32, qsl_ptr=I32, o_ptr=BF16, num_seqs=1,
        stride_kt=HKV * D, stride_kh=D, stride_vt=HKV * D, stride_vh=D, stride_cb=CACHE_STRIDES[0],
        stride_cs=CACHE_STRIDES[1], stride_ch=CACHE_STRIDES[2], stride_ot=HQ * D, stride_oh=D,
        HKV=HKV, HQ=HQ, HEAD_D=D, PAGE=PAGE, BLOCK_HKV=HKV, BLOCK_HQ=HQ, BLOCK_D=D, KV_QUANT=kv_quant,
    )


# name -> (kernel, arguments, (num_warps, num_stages)): the configurations the launch-shape
# rules (kernels/paged_attention/launch_shape.py) pick on an H100/H200 for these shapes.
CONFIGS = {
    "decode_cluster_b8x2048": (_decode_kernel, decode_args(8, 2048, 2, True), (2, 5)),
    "decode_cluster_b8x2048_trace": (_decode_kernel, decode_args(8, 2048, 2, True, trace=True), (2, 5)),
    "decode_ticket4_b4x2048": (_decode_kernel, decode_args(4, 2048, 4, False), (8, 5)),
    "decode_ticket16_b1x8192": (_decode_kernel, decode_args(1, 8192, 16, False), (8, 5)),
    "decode_1split_b64x2048": (_decode_kernel, decode_args(64, 2048, 1, False), (4, 3)),
    "prefill_4096": (_prefill_kernel, dict(prefill_args(4096, 128), BLOCK_N=64, DOT_PREC="tf32"), (8, 3)),
    # Gemma-2's attention soft-capping (50.0): the same shapes, what the cap costs per tile
    "decode_cluster_b8x2048_softcap": (_decode_kernel, decode_args(8, 2048, 2, True, softcap=50.0), (2, 5)),
    "decode_1split_b64x2048_softcap": (_decode_kernel, decode_args(64, 2048, 1, False, softcap=50.0), (4, 3)),
    "prefill_4096_softcap": (_prefill_kernel, dict(prefill_args(4096, 128, softcap=50.0), BLOCK_N=64,
                                                   DOT_PREC="tf32"), (8, 3)),
    # ALiBi (BLOOM, MPT): the same shapes, what the bias costs per tile
    "decode_cluster_b8x2048_alibi": (_decode_kernel, decode_args(8, 2048, 2, True, alibi=True), (2, 5)),
    "decode_1split_b64x2048_alibi": (_decode_kernel, decode_args(64, 2048, 1, False, alibi=True), (4, 3)),
    "prefill_4096_alibi": (_prefill_kernel, dict(prefill_args(4096, 128, alibi=True), BLOCK_N=64,
                                                 DOT_PREC="tf32"), (8, 3)),
    # rope inside the decode kernel (passes/fuse_rotary_attention.py): q and the new key rotated as they load
    "decode_cluster_b8x2048_rope": (_decode_kernel, decode_args(8, 2048, 2, True, rope=True), (2, 5)),
    "decode_ticket16_b1x8192_rope": (_decode_kernel, decode_args(1, 8192, 16, False, rope=True), (8, 5)),
    "decode_1split_b64x2048_rope": (_decode_kernel, decode_args(64, 2048, 1, False, rope=True), (4, 3)),
    "cache_write": (_cache_write_kernel, cache_write_args(), (4, 3)),
}


def compile_sm90(kernel, args, num_warps, num_stages):
    """kernel compiled as its launch would compile it: the JIT's own argument binder and
    specialization (divisibility, ints == 1), for sm_90."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    bound, specialization, options = binder(**args, **opts)
    options, signature, constexprs, attrs = kernel._pack_args(backend, opts, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                          options=options.__dict__)


def nvdisasm_path():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def instructions(cubin: bytes):
    """[(label or None, instruction text)] in order, without addresses and encodings, with
    the kernel's own symbol names replaced by a placeholder."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm_path(), "-c", f.name], check=True, capture_output=True,
                              text=True).stdout
    out, label = [], None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(\.L\w+):", line)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"^/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m:
            ins = re.sub(r"\s+", " ", m.group(1))
            out.append((label, ins))
            label = None
    return out


def loops(ins):
    """Lengths (instructions, branch included) of the loops: BRA back to an earlier label."""
    at = {lab: i for i, (lab, _) in enumerate(ins) if lab}
    sizes = []
    for i, (_, text) in enumerate(ins):
        m = re.search(r"BRA\s+.*?`\((\.L\w+)\)", text)
        if m and m.group(1) in at and at[m.group(1)] <= i:
            sizes.append(i - at[m.group(1)] + 1)
    return sizes


def normalized(ins):
    """Listing for comparison: labels renumbered in order of appearance."""
    names = {}
    for lab, _ in ins:
        if lab:
            names.setdefault(lab, f".L{len(names)}")
    lines = []
    for lab, text in ins:
        if lab:
            lines.append(names[lab] + ":")
        lines.append(re.sub(r"\.L\w+", lambda m: names.get(m.group(0), m.group(0)), text))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write DIR/<config>.sass (normalized listings)")
    ap.add_argument("--check", help="compare with DIR/<config>.sass from an earlier --out")
    ap.add_argument("configs", nargs="*", help=f"a subset of {', '.join(CONFIGS)}")
    a = ap.parse_args()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    print("| config | kernel | warps, stages | SASS | loops (longest first) | hash |" + (" same |" if a.check else ""))
    print("|---|---|---|---:|---|---|" + ("---|" if a.check else ""))
    differ = []
    for name in a.configs or CONFIGS:
        kernel, args, (warps, stages) = CONFIGS[name]
        ins = instructions(compile_sm90(kernel, args, warps, stages).asm["cubin"])
        listing = normalized(ins)
        digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
        sizes = sorted(loops(ins), reverse=True)
        same = ""
        if a.check:
            with open(os.path.join(a.check, f"{name}.sass")) as f:
                same = " yes |" if f.read() == listing else " NO |"
            if same == " NO |":
                differ.append(name)
        print(f"| {name} | {kernel.__name__} | {warps}, {stages} | {len(ins)} | "
              f"{', '.join(map(str, sizes[:4]))} | {digest} |{same}", flush=True)
        if a.out:
            with open(os.path.join(a.out, f"{name}.sass"), "w") as f:
                f.write(listing)
    if differ:
        print(f"SASS differs from {a.check}: {', '.join(differ)}", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
