"""The MLA decode kernels compiled for sm_90 here, without a GPU (what the CPU interpreter
cannot show: that each builds for the H100/H200 as its launcher calls it, within shared
memory and without register spills).

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python tools/check_mla_build.py

Builds kernels/mla_decode.py's `_mla_decode_kernel` at DeepSeek-V2/V3's latent geometry
(kv_lora_rank 512, rope 64, 16 heads a program) with the launcher's GPU tiles (`default_block_n`,
8 warps) in bf16 and fp32, `_merge_splits_kernel` and `_store_latent_kernel`; checks that bf16's dots are tensor-core
MMAs (mma: the 16-head tile is too short for wgmma; fp32 takes exact FMAs) and that the SASS has no local-memory
loads or stores (spills). Prints one line a build with its shared memory; exit status 1 if
one fails. tests/kernels/test_mla_build.py runs it.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build JITFunctions, not interpreted ones
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402

from tools.dump_sass import instructions  # noqa: E402
from tools.sm90_build import compile_or_report  # noqa: E402
from trtllm.kernels.mla_decode import (  # noqa: E402
    BLOCK_H,
    _merge_splits_kernel,
    _mla_decode_kernel,
    _store_latent_kernel,
    default_block_n,
)

I32, F32 = MockTensor(torch.int32), MockTensor(torch.float32)
H, R, P, BS = 16, 512, 64, 16  # DeepSeek-V2-Lite heads; V2/V3 latent and rope; page


def builds():
    for dtype, prec in ((torch.bfloat16, "tf32"), (torch.float32, "ieee")):
        t = MockTensor(dtype)
        name, block_n = str(dtype).removeprefix("torch."), default_block_n(dtype, interpreted=False)
        yield (f"mla_decode {name}, R {R} + P {P}, BLOCK_N {block_n}", _mla_decode_kernel, dict(
            q_lat_ptr=t, q_rope_ptr=t, cache_ptr=t, bt_ptr=I32, lens_ptr=I32, m_ptr=F32, l_ptr=F32, acc_ptr=F32,
            H=H, R=R, P=P, BS=BS, qk_scale=0.1, stride_ql_t=H * R, stride_ql_h=R, stride_qr_t=H * P, stride_qr_h=P,
            stride_blk=BS * (R + P), stride_tok=R + P, stride_bt=128, SPLITS=4, BLOCK_HEADS=BLOCK_H, BLOCK_R=R,
            BLOCK_P=P, BLOCK_N=block_n, DOT_PREC=prec), 8, dtype == torch.bfloat16)  # fp32 "ieee": FMAs
        yield f"merge splits {name}", _merge_splits_kernel, dict(
            m_ptr=F32, l_ptr=F32, acc_ptr=F32, out_ptr=t, H=H, R=R, stride_out_t=H * R, stride_out_h=R, SPLITS=12,
            BLOCK_S=16, BLOCK_R=R), 4, False
        yield f"store latent {name}", _store_latent_kernel, dict(
            latent_ptr=t, cache_ptr=t, slot_ptr=I32, D=R + P, BS=BS, stride_lat=R + P, stride_blk=BS * (R + P),
            stride_tok=R + P, BLOCK_D=1024), 4, False


def main() -> int:
    failed = 0
    for name, kernel, args, warps, dots in builds():
        compiled = compile_or_report(name, kernel, args, warps, 3)
        if compiled is None:
            failed += 1
            continue
        spills = sum(1 for _, ins in instructions(compiled.asm["cubin"]) if ins.split()[0] in ("LDL", "STL")
                     or ins.split()[0].startswith(("LDL.", "STL.")))
        if dots and "mma." not in compiled.asm["ptx"]:
            print(f"FAIL {name}: no mma in the PTX (tl.dot did not become a tensor-core MMA)")
            failed += 1
        elif spills:
            print(f"FAIL {name}: {spills} local-memory loads/stores (register spills)")
            failed += 1
        else:
            print(f"ok   {name}: shared {compiled.metadata.shared} B" + (", mma" if dots else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
