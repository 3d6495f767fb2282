"""Expert parallelism and TP inside experts: each rank's `fused_moe` runs only its experts, on its
slice of their intermediate width, and the ranks' partial outputs are summed. Runs only when
compiled with `tensor_parallel=TensorParallel(...)` of more than one rank (the MoE layers split
the tensor-parallel ranks as TensorRT-LLM's do: parallel/expert_parallel.py); else no match.

Before (what passes/fuse_moe.py made; every rank holds every token, attention being TP):

    w, ids = moe_routing(logits, k, ...)                   # ids [T, k] in [0, E)
    out = fused_moe(x, W13, W2, w, ids)                    # W13 [E, 2I, H], W2 [E, H, I]
After, on the rank of expert-parallel rank p of EP and TP-in-experts rank q of MTP:

    first, El = p * E/EP, E/EP;  Il = I/MTP                # its experts; its features of each
    W13_r = [W13[first:first+El, q*Il:(q+1)*Il]; W13[first:first+El, I+q*Il:I+(q+1)*Il]]  # [El, 2Il, H]
    W2_r = W2[first:first+El, :, q*Il:(q+1)*Il]            # [El, H, Il]
    out = wait_tensor(all_reduce(fused_moe(x, W13_r, W2_r, w, ids - first), "sum"))

With `TensorParallel(quant_algo=...)` (QuantConfig's FP8) the block becomes `fused_moe_fp8` over this
rank's experts quantized as one rank quantizes each whole expert, then sliced
(quantization/fp8_slices.py `rank_fp8_experts`; features split only with 128x128 blocks).

An id outside [0, El) after the shift (another rank's expert) contributes nothing: moe_align
puts it in no expert's run. SiLU(gate) * up is elementwise over the intermediate features and
the down projection sums over them, so the slices of I add up as the experts do: one all-reduce
of [T, H] combines both splits.

Why all-reduce, not all-to-all: every rank already holds every token (attention is
tensor-parallel, its output all-reduced), so nothing needs dispatching; a rank computes its
experts' share of all tokens and one all-reduce, the same collective as a row-parallel linear,
sums the shares (docs/decisions/expert_parallel_combine.md). All-to-all dispatch pays off only
when ranks hold different tokens (attention data parallelism), which is not built.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import trtllm.kernels.fused_moe  # noqa: F401  (registers torch.ops.trtllm.fused_moe)
import trtllm.kernels.fused_moe_fp8  # noqa: F401  (registers torch.ops.trtllm.fused_moe_fp8)
from trtllm.contract import CompileError
from trtllm.parallel.expert_parallel import ExpertParallel
from trtllm.passes.context import PassContext
from trtllm.passes.match import describe, value
from trtllm.quantization.fp8_slices import rank_fp8_experts


def shard_experts(graph: fx.Graph, ctx: PassContext) -> int:
    tp = ctx.tensor_parallel
    if tp is None or tp.size == 1:
        return 0
    moe = tp.moe or ExpertParallel(1, tp.size)
    matches = 0
    for node in [n for n in graph.nodes if n.target is torch.ops.trtllm.fused_moe.default]:
        x, w13_node, w2_node, weights, ids = node.args
        w13, w2 = ctx.inputs.tensor(w13_node), ctx.inputs.tensor(w2_node)
        if w13 is None or w2 is None:
            raise CompileError(f"{describe(node)}: its expert weights are not graph inputs; cannot split them")
        num_experts, inter = w13.shape[0], w13.shape[1] // 2
        if num_experts % moe.moe_ep:
            raise CompileError(f"{describe(node)}: num_experts={num_experts} does not divide among "
                               f"moe_expert_parallel_size={moe.moe_ep}")
        if inter % moe.moe_tp:
            raise CompileError(f"{describe(node)}: the experts' intermediate_size={inter} does not divide among "
                               f"moe_tensor_parallel_size={moe.moe_tp}")
        first, count = moe.experts(tp.rank, num_experts)
        start, length = moe.intermediate(tp.rank, inter)
        out = value(node)
        with graph.inserting_before(node):
            if first:
                shifted = graph.call_function(operator.sub, (ids, first))
                shifted.meta.update(ids.meta)  # int32 [T, k] as the ids
                ids = shifted
        if tp.quant_algo is not None:  # QuantConfig's FP8: this rank's experts, quantized as one rank's
            try:
                fp8 = rank_fp8_experts(tp, w13, w2, first, count, start, length, describe(node))
            except ValueError as e:
                raise CompileError(str(e)) from None
            names = ("w13_fp8", "w2_fp8", "w13_scale", "w2_scale")
            local = [ctx.inputs.add_constant(f"{node.name}_ep_{n}", t) for n, t in zip(names, (fp8[0], fp8[2], fp8[1],
                                                                                            fp8[3]))]
            node.target = torch.ops.trtllm.fused_moe_fp8.default
            node.args = (x, *local, weights, ids)
        else:
            local13 = ctx.inputs.add_constant(f"{node.name}_ep_w13", tp.experts(w13, "w13", first, count, start, length))
            local2 = ctx.inputs.add_constant(f"{node.name}_ep_w2", tp.experts(w2, "w2", first, count, start, length))
            node.args = (x, local13, local2, weights, ids)
        with graph.inserting_after(node):
            reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (node, "sum", tp.group_name))
        with graph.inserting_after(reduced):
            done = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
        for n in (reduced, done):
            n.meta.update(node.meta)
            n.meta["example_value"] = out
        node.replace_all_uses_with(done, delete_user_cb=lambda user, reduced=reduced: user is not reduced)
        matches += 1
    return matches
