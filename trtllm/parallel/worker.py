"""A tensor-parallel worker: the process of rank r > 0 (started by parallel/workers.py, spawn).

It loads its slices, joins the process group, compiles, then runs every call rank 0's
CompiledModel makes, on its own KV cache of the same blocks, until told to stop or its pipe
closes (rank 0 is gone). Its outputs are dropped: rank 0 samples.

The pipe, rank 0 -> worker: `Step` (one model call), `REPORT` (answer ("bytes", n)), None
(stop). Worker -> rank 0: ("loaded", None) once its weights are in, ("error", message) if
anything raises (then it exits), ("bytes", n).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from trtllm.attention_context import AttentionMetadata, PagedKVCache, attention_context
from trtllm.parallel import process_group
from trtllm.parallel.rank_model import RankSpec, compile_rank, load_rank, loaded_bytes, rank_device

REPORT = "report"


@dataclass
class Step:
    """One call of rank 0's CompiledModel: its inputs and, inside the runtime's attention
    context, the step's metadata and which cache it runs on (`cache`: rank 0's cache's
    identity, number of blocks, block size). Plain arrays: pickled by value."""
    input_ids: np.ndarray
    positions: np.ndarray
    logits_indices: np.ndarray | None
    metadata: tuple | None  # AttentionMetadata.state()
    cache: tuple[int, int, int] | None
    decode_graphs: bool


def worker_main(rank: int, spec: RankSpec, init_method: str, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when workers stop
    try:
        device = rank_device(spec, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, slices = load_rank(spec, device)
        conn.send(("loaded", None))
        group_name = process_group.join(rank, spec.world, init_method, device, spec.timeout_s)
        compiled = compile_rank(model, slices, spec, rank, group_name)
        _serve(compiled, conn, device, lambda: loaded_bytes(model, slices))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # rank 0 is gone: nothing to report to
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which names this rank
        traceback.print_exc(file=sys.stderr)
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        process_group.leave()


def _serve(compiled, conn, device: torch.device, report) -> None:
    cache_key, cache, metadata = None, None, None
    while (msg := conn.recv()) is not None:
        if msg == REPORT:
            conn.send(("bytes", report()))
            continue
        ids = torch.from_numpy(msg.input_ids).to(device)
        positions = torch.from_numpy(msg.positions).to(device)
        rows = None if msg.logits_indices is None else torch.from_numpy(msg.logits_indices).to(device)
        if msg.metadata is None:  # whole sequences: CompiledModel makes a scratch cache
            compiled(ids, positions, rows)
            continue
        if msg.cache != cache_key:  # rank 0 runs on another cache now: the same one here
            spec = compiled.attention
            cache = metadata = None
            cache = PagedKVCache.allocate(spec.num_layers, msg.cache[1], msg.cache[2], spec.num_kv_heads,
                                          spec.head_dim, spec.dtype, device)
            metadata = AttentionMetadata(*msg.metadata[0], device)
            cache_key = msg.cache
        metadata.load_state(msg.metadata)
        graphs = compiled.decode_graphs() if msg.decode_graphs else contextlib.nullcontext()
        with attention_context(cache, metadata), graphs:
            compiled(ids, positions, rows)
