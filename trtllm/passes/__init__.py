"""The pass lists: each pass a function `(graph, ctx) -> matches`, run in list order.

PASSES rewrite every compiled call. DECODE_GRAPH_PASSES run after them, only in the
compilation `CompiledModel` keeps for decode CUDA graphs of at most
DECODE_GRAPH_MAX_TOKENS tokens (its "decode graphs" variant, trtllm/compile.py).
use_gemv_linear is a decode-graph pass: over every call, the linears it does not turn
into a GEMV go through the custom op to F.linear, slower than Inductor's own mm, and the
batch-64 decode graph took 7.12 ms against 6.65 without the pass on the H100
(bench/probes/gemv_ab.py; the table in docs/decisions/linear_gemv.md)."""
from trtllm.kernels.linear import GEMV_MAX_M
from trtllm.passes.apply_lora import apply_lora
from trtllm.passes.fuse_add_rms_norm import fuse_add_rms_norm
from trtllm.passes.fuse_lora_linear import fuse_lora_linear
from trtllm.passes.fuse_moe import fuse_moe
from trtllm.passes.fuse_norm_add_rms_norm import fuse_norm_add_rms_norm
from trtllm.passes.fuse_parallel_linears import fuse_parallel_linears
from trtllm.passes.fuse_quantize_fp8_gemm import fuse_quantize_fp8_gemm
from trtllm.passes.fuse_rms_norm import fuse_rms_norm
from trtllm.passes.fuse_rms_norm_quant_fp8 import fuse_rms_norm_quant_fp8
from trtllm.passes.fuse_rms_norm_rotary import fuse_rms_norm_rotary
from trtllm.passes.fuse_rotary import fuse_rotary
from trtllm.passes.fuse_rotary_attention import fuse_rotary_attention
from trtllm.passes.fuse_silu_mul import fuse_silu_mul
from trtllm.passes.fuse_silu_mul_quant_fp8 import fuse_silu_mul_quant_fp8
from trtllm.passes.place_mla_attention import place_mla_attention
from trtllm.passes.quantize_linears import quantize_linears
from trtllm.passes.replace_sdpa_with_bidirectional_attention import replace_sdpa_with_bidirectional_attention
from trtllm.passes.replace_sdpa_with_paged_attention import replace_sdpa_with_paged_attention
from trtllm.passes.shard_experts import shard_experts
from trtllm.passes.shard_tensor_parallel import shard_tensor_parallel
from trtllm.passes.shard_vocab_parallel import shard_vocab_parallel
from trtllm.passes.split_heads_from_fused import split_heads_from_fused
from trtllm.passes.split_lm_head import split_lm_head
from trtllm.passes.split_pipeline_stage import split_pipeline_stage
from trtllm.passes.stash_hidden_states import stash_hidden_states
from trtllm.passes.use_gemv_linear import use_gemv_linear

PASSES = [
    place_mla_attention,                # first: DeepSeek's latent attention, before its SDPA is paged as K/V
    replace_sdpa_with_paged_attention,  # refuse unsupported attention before any work
    split_pipeline_stage,               # before shard_tensor_parallel: it splits only this stage's layers
    stash_hidden_states,                # while every node has its module path (EAGLE-3's states)
    shard_tensor_parallel,              # before fuse_parallel_linears, which fuses each rank's slices
    quantize_linears,                   # before fuse_parallel_linears: FP8 weights stack as FP8
    fuse_moe,                           # before the linear, silu-mul passes rewrite the experts' ops
    shard_experts,                      # after fuse_moe: each rank's fused_moe runs its experts
    fuse_parallel_linears,
    apply_lora,                         # after fuse_parallel_linears: one shrink for fused q/k/v, gate/up
    fuse_lora_linear,                   # apply_lora's plain linears: one op (two launches at decode)
    fuse_rms_norm,
    fuse_add_rms_norm,                  # needs fuse_rms_norm's output
    fuse_rms_norm_quant_fp8,            # needs both norms' ops and quantize_linears' quantizations
    fuse_norm_add_rms_norm,             # after it (an FP8 model's norm + quantize wins the add); Gemma-2/3's sandwich norms
    fuse_rotary,
    fuse_rms_norm_rotary,               # needs fuse_rotary's and fuse_rms_norm's ops: QK-norm into rope
    fuse_rotary_attention,              # after it: the plain ropes left go into attention
    fuse_silu_mul,
    fuse_silu_mul_quant_fp8,            # needs fuse_silu_mul's op and quantize_linears' quantizations
    split_heads_from_fused,             # after the passes that read fused linears' plain parts (apply_lora)
    split_lm_head,                      # the runtime applies the head on chosen rows
    shard_vocab_parallel,               # last: splits the head split_lm_head took out
]

DECODE_GRAPH_PASSES = [
    use_gemv_linear,                    # after split_lm_head has found the head as a linear
    fuse_quantize_fp8_gemm,             # an FP8 GEMV quantizes its own input: one launch fewer a linear
]

# the decode graphs DECODE_GRAPH_PASSES serve: those whose linears a GEMV computes
DECODE_GRAPH_MAX_TOKENS = GEMV_MAX_M

# trtllm.compile_encoder's list: vision encoders (bidirectional attention over whole images,
# no cache); the decoder's PASSES keep refusing non-causal attention
ENCODER_PASSES = [
    replace_sdpa_with_bidirectional_attention,
]
