"""The paged attention kernels with a quantized KV cache (FP8 e4m3, INT8;
kernels/paged_attention/kv_quant.py) compiled for sm_90 here, without a GPU, and checked
for what the CPU interpreter cannot show.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python tools/check_kv_quant_build.py

For each kernel that writes the cache (the cache-write kernel, the decode kernel's new key):
the quotient x / scale is an IEEE division (div.rn.f32); fp8: the cast to e4m3 rounds to
nearest with saturation (cvt.rn.satfinite.e4m3x2.f32), no other cast to e4m3; int8: the round
to nearest even of `_rint` (an add and a subtract of 1.5 * 2**23) survived compilation to the
SASS, not folded away. The prefill kernel quantizes nothing (it reads the new tokens' keys as
the cache write stored them): no division, no cast to e4m3. Every attention kernel reads
e4m3 / int8 tiles and converts them (cvt from e4m3, or from s8). Prints one line a kernel, with its SASS size and loop lengths beside the bf16 cache's
(the same shapes as tools/dump_sass.py: Hq=32, Hkv=8, D=128, page 16); exit status 1 if
a check fails. tests/kernels/test_kv_quant_build.py runs it.
"""
import os
import re
import sys

os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build JITFunctions, not interpreted ones
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.dump_sass import (  # noqa: E402
    cache_write_args,
    compile_sm90,
    decode_args,
    instructions,
    loops,
    prefill_args,
)
from trtllm.kernels.paged_attention.decode import _decode_kernel  # noqa: E402
from trtllm.kernels.paged_attention.prefill import _cache_write_kernel, _prefill_kernel  # noqa: E402

MAGIC = re.compile(r"^FADD .*, -?12582912$")  # an add of +-1.5 * 2**23 in SASS


def builds(kv_quant):
    """(name, kernel, args, (warps, stages), writes): the configurations tools/dump_sass.py
    compiles, with a quantized cache; writes: whether the kernel quantizes (the prefill kernel
    reads the new tokens' keys from the cache)."""
    yield "cache_write", _cache_write_kernel, cache_write_args(kv_quant), (4, 3), True
    yield "decode_cluster_b8x2048", _decode_kernel, decode_args(8, 2048, 2, True, kv_quant=kv_quant), (2, 5), True
    yield "decode_ticket16_b1x8192", _decode_kernel, decode_args(1, 8192, 16, False, kv_quant=kv_quant), (8, 5), True
    yield "decode_1split_b64x2048", _decode_kernel, decode_args(64, 2048, 1, False, kv_quant=kv_quant), (4, 3), True
    yield ("prefill_4096", _prefill_kernel, dict(prefill_args(4096, 128, kv_quant=kv_quant), BLOCK_N=64,
                                                 DOT_PREC="tf32"), (8, 3), False)
    yield ("decode_1split_b64x2048_softcap", _decode_kernel,
           decode_args(64, 2048, 1, False, softcap=50.0, kv_quant=kv_quant), (4, 3), True)


def check(kv_quant, name, kernel, args, warps, stages, writes) -> list[str]:
    compiled = compile_sm90(kernel, args, warps, stages)
    ptx = compiled.asm["ptx"]
    problems = []
    if writes and "div.rn.f32" not in ptx:
        problems.append("no IEEE division (div.rn.f32) for x / scale")
    if not writes and "div.rn.f32" in ptx:
        problems.append("an IEEE division (div.rn.f32): a kernel that reads the cache quantizes something")
    to_e4m3 = set(re.findall(r"\bcvt\.[a-z0-9.]*e4m3x2\.f32\b", ptx))
    from_e4m3 = set(re.findall(r"\bcvt\.[a-z0-9.]*\.e4m3x2\b", ptx))
    if kv_quant == "fp8":
        if to_e4m3 != ({"cvt.rn.satfinite.e4m3x2.f32"} if writes else set()):
            problems.append(f"casts to e4m3 {sorted(to_e4m3)}: expected "
                            f"{'cvt.rn.satfinite.e4m3x2.f32 only' if writes else 'none'}")
        if kernel is not _cache_write_kernel and not from_e4m3:
            problems.append("no conversion from e4m3 (the cached tiles)")
    else:
        if to_e4m3 or from_e4m3:
            problems.append(f"e4m3 casts in an int8 kernel: {sorted(to_e4m3 | from_e4m3)}")
        if kernel is not _cache_write_kernel and not re.search(r"\bcvt\.rn\.f(16|32)\.s(8|16|32)\b", ptx):
            problems.append("no conversion from int8 (the cached tiles)")
    bf16 = args["k_ptr"]
    plain = dict(args, kc_ptr=bf16, vc_ptr=bf16, ks_ptr=bf16, vs_ptr=bf16, KV_QUANT="")
    ins, ins_plain = (instructions(c.asm["cubin"]) for c in (compiled, compile_sm90(kernel, plain, warps, stages)))
    rint = [t for _, t in ins if MAGIC.match(t)]
    if kv_quant == "int8" and writes and not (any("-12582912" in t for t in rint) and any("-" not in t for t in rint)):
        problems.append("the round to nearest (+ and - 1.5 * 2**23) was folded away")
    sizes, sizes_plain = (sorted(loops(i), reverse=True)[:3] for i in (ins, ins_plain))
    print(f"{kv_quant} {name}: {len(ins)} SASS (bf16 cache {len(ins_plain)}), loops {sizes} "
          f"(bf16 cache {sizes_plain}); e4m3 casts {sorted(to_e4m3 | from_e4m3)}", flush=True)
    return problems


def main() -> int:
    problems = []
    for kv_quant in ("fp8", "int8"):
        for name, kernel, args, (warps, stages), writes in builds(kv_quant):
            problems += [f"{kv_quant} {name}: {p}" for p in check(kv_quant, name, kernel, args, warps, stages, writes)]
    print(*problems, sep="\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
