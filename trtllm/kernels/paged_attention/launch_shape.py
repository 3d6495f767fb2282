"""How one paged attention call runs on a GPU, as a value: which kernel, how many
flash-decoding splits and how they merge, which tiles. `choose_launch` is the default
(tuned on the H100, docs/decisions/decode_attention.md); tests and benches build their own choice and pass
it to `launch_paged_attention` (op.py)."""
import functools
from dataclasses import dataclass

import torch
import triton

from trtllm.kernels.paged_attention.cluster import cluster_launchable


@dataclass(frozen=True)
class PrefillLaunch:
    """The prefill kernel (prefill.py; any batch, the only one for max_query_len > 1): a
    tile is block_m rows (block_m // G tokens x the G query heads of one kv head) against
    block_n keys."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeLaunch:
    """The decode kernel (decode.py; max_query_len == 1): `splits` programs per (sequence,
    kv head) each attend over a run of the context; with splits > 1 their partials merge
    inside a thread-block cluster (cluster=True: sm_90+, 2 to 8 splits) or through global
    memory and an atomic ticket (cluster=False). Tiles of block_n keys."""
    splits: int
    cluster: bool
    block_n: int
    num_warps: int
    num_stages: int


def choose_launch(q: torch.Tensor, k_cache: torch.Tensor, num_seqs: int, max_query_len: int,
                  max_seq_len: int) -> PrefillLaunch | DecodeLaunch:
    """The default: the decode kernel for a decode-only batch (max_query_len == 1), with
    num_splits' splits, merged as merges_in_cluster says; else the prefill kernel."""
    head_dim, group = q.shape[-1], q.shape[1] // k_cache.shape[3]
    if max_query_len == 1 and num_seqs > 0:
        splits = num_splits(num_seqs, k_cache.shape[3], max_seq_len, q.device)
        return decode_launch(splits, merges_in_cluster(splits, q.device), head_dim, q.element_size())
    return PrefillLaunch(*prefill_config(head_dim, group, max_query_len, q.element_size()))


def decode_launch(splits: int, cluster: bool, head_dim: int, elem_size: int) -> DecodeLaunch:
    """`splits` merged in a cluster or by ticket, with the tiles tuned for them."""
    return DecodeLaunch(splits, cluster, *decode_config(head_dim, elem_size, splits, cluster))


# Flash-decoding: split a sequence's context only while the grid is smaller than
# SPLIT_TARGET_PER_SM programs per SM, and never into pieces shorter than SPLIT_MIN_LEN
# positions: on the H100 one program per SM and 64-position pieces beat 2 per SM and 256,
# b1 x 8192 26.6 us at 16 splits against 33.9 at 32 (bench/probes/sweep_decode.py; the
# other shapes in docs/decisions/decode_attention.md).
SPLIT_TARGET_PER_SM = 1
SPLIT_MIN_LEN = 64
MAX_SPLITS = 64


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the H100 the heuristics are tuned for; the interpreter tests use it too


def num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Flash-decoding splits: fill ~SPLIT_TARGET_PER_SM programs per SM, e.g. on H100
    batch 8 x 8 kv heads -> 2 splits; batch 1 x 8192 ctx -> 16; batch >= 17 -> 1."""
    target = SPLIT_TARGET_PER_SM * _num_sms(device)
    by_grid = target // max(num_seqs * num_kv_heads, 1)
    by_len = max_seq_len // SPLIT_MIN_LEN
    return max(1, min(by_grid, by_len, MAX_SPLITS))


def merges_in_cluster(splits: int, device: torch.device) -> bool:
    """The default merge: 2 splits on sm_90+ merge inside a thread-block cluster. Not 4 or
    8: the hardware puts two programs of such clusters on one SM (120 SMs busy, not 128),
    and b4 x 2048 takes 21-22 us in clusters of 4 against 18.6 by ticket on the H100 (time
    `DecodeLaunch(4, True, ...)` in bench/bench_attention.py's graphed_layers;
    docs/decisions/decode_attention.md)."""
    return splits == 2 and cluster_launchable(device)


def decode_config(head_dim: int, elem_size: int, splits: int, cluster: bool = False):
    """(BLOCK_N, num_warps, num_stages): 64 x 128 bf16 K + V = 32 KB per buffer.

    The K/V addresses come from a block-table load inside the loop, and Triton's
    pipeliner gives that load a stage of its own: num_stages 5 double-buffers K/V (72 KB
    smem: 3 programs per SM), 3 single-buffers them (more programs per SM). Measured on
    H100 (bench/probes/sweep_decode.py): a full grid (1 split, b64 x 2048) runs 195 us at 3
    stages against 222 at 5; a split grid (small batch) wants 5 stages, and 8 warps gain
    6-10% at b1 x 2048-8192 (16 splits, ticket merge: 9.5-9.9 against 11.2-12.0 us with 4).
    The cluster merge (2 splits) runs 2 warps: b8 x 2048 27.85 us per layer against 28.00
    with 4 and 28.16 with 8 (H100, by turns; bench/probes/decode_timeline.py --b8-configs;
    b8 x 512 and x 8192 in docs/decisions/decode_attention.md). Per tile, warps x SASS:
    8 x 251, 4 x 371, 2 x 483 (tools/dump_sass.py): fewer instructions, and fewer warps to
    meet at each barrier."""
    if elem_size == 4 or head_dim > 128:
        return 32, 4, 3
    if splits == 1:
        return 64, 4, 3
    return (64, 2, 5) if cluster else (64, 8, 5)


def prefill_config(head_dim: int, group: int, max_query_len: int, elem_size: int):
    """(BLOCK_M rows = BLOCK_Q tokens x G heads, BLOCK_N, num_warps, num_stages)."""
    rows = max_query_len * group
    if elem_size == 4:  # fp32 (exact "ieee" dots on FMA units): a correctness path
        block_m, block_n, warps, stages = 64, 16, 8, 2  # 64x32x4 warps spills 45 KB at D=128
    elif rows <= 32:  # short chunks / spec-decode-like: don't pad 4 rows to 128
        block_m, block_n, warps, stages = 32 if rows > 16 else 16, 64, 4, 3
    elif head_dim <= 128:
        # sm_90 ptxas: D=128 -> 192 regs, 128 KB smem, no spills (128x128 tiles spill);
        # D=64 with 4 warps needs 255 regs, with 8 warps 124.
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 2  # D=256: 196 regs, 96 KB smem
    return max(block_m, triton.next_power_of_2(group)), block_n, warps, stages
