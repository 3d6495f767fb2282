"""The MoE kernels compiled for sm_90 here, without a GPU (what the CPU interpreter cannot
show: that each one builds for the H100/H200 as its launcher calls it).

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python tools/check_moe_build.py

Builds kernels/moe_align.py's two kernels, kernels/moe_routing.py's kernel (Qwen3-MoE's
softmax top-8 of 128; DeepSeek-V3's sigmoid grouped top-8 of 256 with bias) and
kernels/fused_moe.py's two grouped GEMMs at Qwen3-30B-A3B's expert shapes with each
`moe_config` tile (decode, small and large batches), and checks that the bf16 GEMMs' tl.dot
became tensor-core MMAs (wgmma for 64-row tiles, mma for 16-row ones). Prints one line a
build; exit status 1 if one fails. tests/kernels/test_moe_build.py runs it.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit must build JITFunctions, not interpreted ones
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402

from tools.sm90_build import compile_or_report  # noqa: E402
from trtllm.kernels.fused_moe import _down_kernel, _gate_up_kernel, moe_config  # noqa: E402
from trtllm.kernels.fused_moe_decode import _decode_down_kernel, _decode_gate_up_kernel, decode_config  # noqa: E402
from trtllm.kernels.fused_moe_fp8 import _fp8_down_kernel, _fp8_gate_up_kernel, _tile_config  # noqa: E402
from trtllm.kernels.moe_align import _count_kernel, _scatter_kernel  # noqa: E402
from trtllm.kernels.moe_routing import _moe_routing_kernel  # noqa: E402

I32, F32, BF16 = MockTensor(torch.int32), MockTensor(torch.float32), MockTensor(torch.bfloat16)
FP8 = MockTensor(torch.float8_e4m3fn)
E, K, H, INTER = 128, 8, 2048, 768  # Qwen3-30B-A3B: experts, top-k, hidden, expert intermediate


def routing(experts: int, groups: int, topk_group: int, softmax: bool, bias: bool) -> dict:
    per_group = experts // groups
    return dict(logits_ptr=BF16, bias_ptr=F32, weights_ptr=F32, ids_ptr=I32, num_experts=experts,
                logits_row_stride=experts, routed_scaling_factor=2.5, EXPERTS_PER_GROUP=per_group, N_GROUP=groups,
                TOPK_GROUP=topk_group, TOP_K=K, SOFTMAX=softmax, HAS_BIAS=bias, RENORMALIZE=True,
                BLOCK_G=groups, BLOCK_EG=per_group, BLOCK_K=K)


def builds():
    slots = 4096 * K
    yield "moe_align count", _count_kernel, dict(ids_ptr=I32, counts_ptr=I32, num_slots=slots, BLOCK=1024), 4, None
    yield "moe_align scatter", _scatter_kernel, dict(ids_ptr=I32, starts_ptr=I32, counts_ptr=I32, sorted_ptr=I32,
                                                      expert_ids_ptr=I32, num_slots=slots, BLOCK_M=64, BLOCK=1024), 4, None
    yield "routing softmax top-8 of 128", _moe_routing_kernel, routing(128, 1, 1, True, False), 4, None
    yield "routing DeepSeek-V3 grouped", _moe_routing_kernel, routing(256, 8, 4, False, True), 4, None
    for tokens in (1, 64, 4096):
        cfg = moe_config(tokens * K, E, H, INTER)
        mma = "wgmma" if cfg.block_m >= 64 else "mma"
        tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                     DOT_PRECISION="tf32")
        common = dict(sorted_ids_ptr=I32, expert_ids_ptr=I32, total_ptr=I32, num_slots=tokens * K, hidden=H, inter=INTER,
                      num_tiles=tokens * K // cfg.block_m + E)
        yield (f"fused_moe gate/up, {tokens} tokens", _gate_up_kernel,
               dict(x_ptr=BF16, w13_ptr=BF16, h_ptr=BF16, x_row_stride=H, w13_expert_stride=2 * INTER * H,
                    w13_row_stride=H, h_row_stride=INTER, TOP_K=K, **common, **tiles), cfg.num_warps, (cfg.num_stages, mma))
        yield (f"fused_moe down, {tokens} tokens", _down_kernel,
               dict(h_ptr=BF16, w2_ptr=BF16, o_ptr=F32, weights_ptr=F32, h_row_stride=INTER, w2_expert_stride=H * INTER,
                    w2_row_stride=INTER, o_row_stride=H, **common, **tiles), cfg.num_warps, (cfg.num_stages, mma))


def fp8_and_decode_builds():
    """kernels/fused_moe_decode.py's two kernels (bf16 weights; fp8 with per-channel and block
    scales) at 1 and 16 tokens, kernels/fused_moe_fp8.py's two grouped GEMMs at 64 and 4096 tokens."""
    kb, ib, i2b = -(-H // 128), -(-INTER // 128), -(-2 * INTER // 128)
    for scales, weight in ((0, BF16), (1, FP8), (2, FP8)):
        cfg = decode_config(H, INTER, block_scales=scales == 2)
        x = BF16 if scales == 0 else FP8
        ws13 = (2 * INTER, 1) if scales == 1 else (i2b * kb, kb)
        ws2 = (H, 1) if scales == 1 else (kb * ib, ib)
        meta = dict(TOP_K=K, SCALES=scales, SCALE_BLOCK=128, DOT_PRECISION="tf32",
                    MAX_IMPRECISE_ACC=min(cfg.block_k, 128) if scales else None, BLOCK_T=16, BLOCK_J=K,
                    BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
        for tokens in (1, 16):
            common = dict(ids_ptr=I32, num_tokens=tokens, hidden=H, inter=INTER, num_experts=E, **meta)
            name = f"decode {('bf16', 'fp8 per-channel', 'fp8 blocks')[scales]}, {tokens} tokens"
            yield (f"{name} gate/up", _decode_gate_up_kernel,
                   dict(x_ptr=x, xs_ptr=F32, w13_ptr=weight, ws_ptr=F32, h_ptr=BF16, x_row_stride=H,
                        xs_row_stride=kb if scales == 2 else 1, w13_expert_stride=2 * INTER * H, w13_row_stride=H,
                        ws_expert_stride=ws13[0] if scales else 0, ws_row_stride=ws13[1] if scales else 0,
                        h_row_stride=INTER, **common), cfg.num_warps, (cfg.num_stages, "mma"))
            yield (f"{name} down", _decode_down_kernel,
                   dict(h_ptr=x, hs_ptr=F32, w2_ptr=weight, ws_ptr=F32, o_ptr=BF16, weights_ptr=F32,
                        h_row_stride=INTER, hs_row_stride=ib if scales == 2 else 1, w2_expert_stride=H * INTER,
                        w2_row_stride=INTER, ws_expert_stride=ws2[0] if scales else 0,
                        ws_row_stride=ws2[1] if scales else 0, o_row_stride=H, **common),
                   cfg.num_warps, (cfg.num_stages, "mma"))
    for block in (False, True):
        for tokens in (64, 4096):
            cfg = _tile_config(tokens * K, E, H, INTER, block)
            mma = "wgmma" if cfg.block_m >= 64 else "mma"
            tiles = dict(BLOCK_SCALES=block, SCALE_BLOCK=128, DOT_PRECISION="tf32",
                         MAX_IMPRECISE_ACC=min(cfg.block_k, 128), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                         BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
            common = dict(sorted_ids_ptr=I32, expert_ids_ptr=I32, total_ptr=I32, num_slots=tokens * K, hidden=H,
                          inter=INTER, num_tiles=tokens * K // cfg.block_m + E)
            ws13 = (i2b * kb, kb) if block else (2 * INTER, 1)
            ws2 = (kb * ib, ib) if block else (H, 1)
            name = f"fused_moe_fp8 {'blocks' if block else 'per-channel'}, {tokens} tokens"
            yield (f"{name} gate/up", _fp8_gate_up_kernel,
                   dict(x_ptr=FP8, xs_ptr=F32, w13_ptr=FP8, ws_ptr=F32, h_ptr=BF16, x_row_stride=H,
                        xs_row_stride=kb if block else 1, w13_expert_stride=2 * INTER * H, w13_row_stride=H,
                        ws_expert_stride=ws13[0], ws_row_stride=ws13[1], h_row_stride=INTER, TOP_K=K,
                        **common, **tiles), cfg.num_warps, (cfg.num_stages, mma))
            yield (f"{name} down", _fp8_down_kernel,
                   dict(h_ptr=FP8, hs_ptr=F32, w2_ptr=FP8, ws_ptr=F32, o_ptr=BF16, weights_ptr=F32,
                        h_row_stride=INTER, hs_row_stride=ib if block else 1, w2_expert_stride=H * INTER,
                        w2_row_stride=INTER, ws_expert_stride=ws2[0], ws_row_stride=ws2[1], o_row_stride=H,
                        **common, **tiles), cfg.num_warps, (cfg.num_stages, mma))


def main() -> int:
    failed = 0
    for name, kernel, args, warps, gemm in (*builds(), *fp8_and_decode_builds()):
        stages, mma = gemm if gemm else (1, None)
        compiled = compile_or_report(name, kernel, args, warps, stages)
        if compiled is None:
            failed += 1
            continue
        ptx = compiled.asm["ptx"]
        if mma is not None and f"{mma}." not in ptx:
            print(f"FAIL {name}: no {mma} in the PTX (tl.dot did not become a tensor-core MMA)")
            failed += 1
            continue
        print(f"ok   {name}" + (f": {mma}" if mma else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
