"""Paged attention over a ragged batch: cache write + causal attention, one op
(`torch.ops.trtllm.paged_attention`).

    op.py            the semantics (formula, shapes), `paged_attention_ref`, the launcher
                     `launch_paged_attention`, the registration
    launch_shape.py  how a call runs, as a value (`PrefillLaunch` / `DecodeLaunch`), and
                     `choose_launch`, the default tuned on the H100
    prefill.py       the cache-write and prefill kernels (any batch)
    decode.py        the decode kernel (max_query_len == 1: one launch per layer)
    decode_merge.py  its tails: the store, or the merge of split partials (cluster, ticket)
    tiles.py         tile-level pieces both kernels share (online softmax step, loads)
    cluster.py       thread-block clusters from Triton (the decode merge's)
    trace.py         the decode kernel's phase stamps (bench/probes/decode_timeline.py)
"""
from trtllm.kernels.paged_attention.launch_shape import DecodeLaunch, PrefillLaunch, choose_launch, decode_launch
from trtllm.kernels.paged_attention.op import launch_paged_attention, paged_attention, paged_attention_ref

__all__ = ["DecodeLaunch", "PrefillLaunch", "choose_launch", "decode_launch", "launch_paged_attention",
           "paged_attention", "paged_attention_ref"]
