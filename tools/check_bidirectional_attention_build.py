"""The vision encoder's attention kernel compiled for sm_90 here, without a GPU (what the CPU
interpreter cannot show: that it builds for the H100/H200 as its launcher calls it, and that its
16-bit dots are tensor-core MMAs).

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python tools/check_bidirectional_attention_build.py

Builds kernels/bidirectional_attention.py's kernel at CLIP ViT-L/14-336's shapes (577 tokens,
16 heads of 64) in bf16 and fp16 with the launcher's tiles, and at head dim 128 and in fp32
(IEEE dots); checks the 16-bit builds' PTX holds wgmma or mma. One line a build; exit status 1 if
one fails. tests/kernels/test_bidirectional_attention.py runs it.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build JITFunctions, not interpreted ones
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402

from tools.sm90_build import compile_or_report  # noqa: E402
from trtllm.kernels.bidirectional_attention import _bidirectional_attention_kernel  # noqa: E402


def args(dtype: torch.dtype, seq: int, heads: int, dim: int, block_d: int) -> dict:
    t = MockTensor(dtype)
    strides = dict(q_sb=seq * 3 * heads * dim, q_sh=dim, q_ss=3 * heads * dim)  # a fused qkv projection's view
    contiguous = dict(sb=heads * seq * dim, sh=seq * dim, ss=dim)
    return dict(q_ptr=t, k_ptr=t, v_ptr=t, out_ptr=t, seq_len=seq, num_heads=heads, head_dim=dim, scale=0.125,
                **strides, k_sb=strides["q_sb"], k_sh=dim, k_ss=strides["q_ss"], v_sb=strides["q_sb"], v_sh=dim,
                v_ss=strides["q_ss"], o_sb=contiguous["sb"], o_sh=contiguous["sh"], o_ss=contiguous["ss"],
                BLOCK_M=64 if block_d <= 64 else 32, BLOCK_N=64 if block_d <= 64 else 32, BLOCK_D=block_d,
                IEEE=dtype == torch.float32)


def main() -> int:
    failed = 0
    builds = [("bf16 ViT-L/14-336", torch.bfloat16, 577, 16, 64, 64, True),
              ("fp16 ViT-L/14-336", torch.float16, 577, 16, 64, 64, True),
              ("bf16 head dim 128", torch.bfloat16, 577, 8, 128, 128, True),
              ("fp32 head dim 64 (IEEE)", torch.float32, 577, 16, 64, 64, False)]
    for name, dtype, seq, heads, dim, block_d, mma in builds:
        compiled = compile_or_report(name, _bidirectional_attention_kernel, args(dtype, seq, heads, dim, block_d), 4, 2)
        if compiled is None:
            failed += 1
            continue
        ptx = compiled.asm["ptx"]
        found = "wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx else None
        if mma and found is None:
            print(f"FAIL {name}: no tensor-core MMA in the PTX")
            failed += 1
            continue
        print(f"ok   {name}" + (f": {found}" if found else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
