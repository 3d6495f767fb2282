"""A parallel worker: the process of rank r > 0, started by parallel/workers.py (spawn) or by
torchrun (`run_torchrun_worker`).

It loads its stage's weights (its slices of them), joins the process groups, compiles, then
runs every call rank 0's CompiledModel makes, on its own KV cache of the same blocks, until
told to stop or rank 0 is gone. A stage after the first receives its input (the hidden states)
from the same tensor-parallel rank of the stage before; a stage before the last sends its output
to the next; the last stage's first tensor-parallel rank sends the logits to rank 0, which
samples. Other outputs are dropped.

Steps come over the control group (step_channel.py): `Step` (one model call, with each token's
LoRA slot), `CopyBlocks` (beam search's copy-on-write blocks, into this rank's cache),
`LoadAdapter` (rank 0 put a LoRA adapter in a slot: this rank writes its part), `LORA_MODULES`
then `LoraModules` (every rank's wrapped linears, gathered then shared), `REPORT` (every
rank gathers its loaded bytes to rank 0), `KV_BLOCKS` (every rank gathers how many KV blocks
fit its free memory), None (stop). A spawned worker also has a pipe to rank 0 for
("loaded", None) once its weights are in and ("error", message) if anything raises (then it exits).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from trtllm.attention_context import AttentionMetadata, PagedKVCache, attention_context
from trtllm.kernels.linear_lora import no_adapters
from trtllm.kernels.paged_attention.kv_quant import KV_CACHE_DTYPES
from trtllm.lora_request import LoRARequest
from trtllm.multimodal_context import MultimodalEmbeddings, multimodal_context
from trtllm.parallel import process_group
from trtllm.parallel.pipeline_parallel import stage_input
from trtllm.parallel.rank_model import RankSpec, compile_rank, load_rank, loaded_bytes, rank_device, rank_kv_scales
from trtllm.parallel.step_channel import StepChannel
from trtllm.runtime.adapters import Adapters

REPORT = "report"
KV_BLOCKS = "kv_blocks"
KV_AMAX = "kv_amax"  # every rank gathers the largest |K| and |V| its last step's cache holds, per layer and head
LORA_MODULES = "lora_modules"
QUANTIZED = tuple(str(d) for d in KV_CACHE_DTYPES.values())  # a quantized cache's dtype, as Step.cache says it


@dataclass
class Step:
    """One call of rank 0's CompiledModel: its inputs and, inside the runtime's attention
    context, the step's metadata and which cache it runs on (`cache`: rank 0's cache's
    identity, number of blocks, block size). Plain arrays: pickled by value."""
    input_ids: np.ndarray
    positions: np.ndarray
    logits_indices: np.ndarray | None
    metadata: tuple | None  # AttentionMetadata.state()
    cache: tuple[int, int, int, str] | None  # rank 0's cache: identity, blocks, block size, dtype
    decode_graphs: bool
    lora_slot_ids: np.ndarray | None = None  # each token's LoRA slot (-1: none), with LoRA slots
    no_adapters: bool = False  # no token has an adapter (kernels/linear_lora.py's no_adapters)
    # a multimodal model's image rows: (each token's feature row, -1 for text [T] int64; features
    # [K, hidden] on the host), as rank 0 staged them (trtllm/multimodal_context.py); None: no image token
    images: tuple[np.ndarray, torch.Tensor] | None = None


@dataclass
class CopyBlocks:
    """Beam search's copy-on-write blocks (runtime/block_manager.py): each (source, copy, tokens)
    block's K/V of its first `tokens` positions, every layer, into the copy, before the next step
    writes it (rank 0's runner copies its own)."""
    copies: list[tuple[int, int, int]]


@dataclass
class LoadAdapter:
    """Rank 0 put the adapter `request` names into LoRA slot `slot`: this rank writes its part of it
    there (LoraSlots.image: its shards, its stage's linears), read from the same directory, and
    answers None or why it could not (the files changed or went away since rank 0 read them)."""
    slot: int
    request: LoRARequest


@dataclass
class LoraModules:
    """Every rank's wrapped linears (path -> whole (in, out) features): what an adapter is checked
    against, the others' kept as LoraSlots.elsewhere."""
    modules: dict


@dataclass
class KvScales:
    """The whole model's KV cache scales [L, 2, Hkv], calibrated across the ranks at start-up
    (parallel/kv_calibration.py): this rank's quantized caches take its layers' and heads'."""
    scales: torch.Tensor


@dataclass
class KvBlocks:
    """Ask every rank how many KV blocks of its layers fit `fraction` of its free GPU memory."""
    fraction: float
    block_size: int


def worker_main(rank: int, spec: RankSpec, init_method: str, conn, local_rank: int | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when workers stop
    try:
        device = rank_device(spec, rank, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, slices = load_rank(spec, rank, device)
        if conn is not None:
            conn.send(("loaded", None))
        groups = process_group.join(rank, spec.world, init_method, device, spec.timeout_s, spec.tp)
        compiled = compile_rank(model, slices, spec, rank, groups)
        _serve(compiled, StepChannel(groups.control, rank), spec, rank, device, lambda: loaded_bytes(model, slices))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # rank 0 is gone: nothing to report to
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which names this rank
        traceback.print_exc(file=sys.stderr)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(("error", f"{type(e).__name__}: {e}"))
        if conn is None:  # under torchrun: the exit code tells the launcher
            raise
    finally:
        process_group.leave()


def run_torchrun_worker(spec: RankSpec) -> None:
    """Rank RANK > 0 of a torchrun launch: serve rank 0's steps until it stops (docs/parallel.md)."""
    worker_main(int(os.environ["RANK"]), spec, "env://", None, int(os.environ.get("LOCAL_RANK", "0")))


def _serve(compiled, channel: StepChannel, spec: RankSpec, rank: int, device: torch.device, report) -> None:
    stage, tp_rank = spec.place(rank)
    last = stage == spec.pp - 1
    hidden_size = compiled.pipeline.hidden_size if compiled.pipeline is not None else 0
    dtype = compiled.pipeline.dtype if compiled.pipeline is not None else None
    sends: deque = deque()  # (work, tensor): the tensor lives until the send is done
    cache_key, cache, metadata = None, None, None
    kv_scales = spec.kv_cache_scales  # the whole model's; KvScales replaces them (calibrated at start-up)
    adapters = None if compiled.lora is None else \
        Adapters(spec.lora.config, compiled.lora, next(compiled.module.parameters()).dtype)
    images = _image_buffers(compiled, spec, stage, device)  # a first stage's, of a multimodal model
    while (msg := _next_step(channel, rank)) is not None:
        if msg == REPORT:
            channel.gather(report())
            continue
        if msg == LORA_MODULES:
            channel.gather(compiled.lora.wrapped())
            continue
        if isinstance(msg, LoraModules):
            compiled.lora.elsewhere = {p: f for p, f in msg.modules.items() if p not in compiled.lora.modules}
            continue
        if isinstance(msg, LoadAdapter):  # its host cache as rank 0's (max_cpu_loras images, LRU)
            try:
                compiled.lora.load_image(msg.slot, adapters.host_image(msg.request))
                failure = None
            except ValueError as e:  # its files changed or went away since rank 0 read them (named)
                failure = str(e)
            except OSError as e:
                failure = f"LoRA adapter {msg.request.lora_name!r} ({msg.request.lora_path}) could not be read: " \
                          f"{type(e).__name__}: {e}"
            channel.gather(failure)  # rank 0 refuses the request by it; this rank serves on
            continue
        if isinstance(msg, KvBlocks):
            channel.gather(_kv_blocks(compiled, msg, device,
                                      _cache_format(spec, compiled.attention, rank, kv_scales)[0]))
            continue
        if msg == KV_AMAX:
            channel.gather(cache_amax(cache))
            continue
        if isinstance(msg, KvScales):
            kv_scales = msg.scales
            continue
        if isinstance(msg, CopyBlocks):
            cache.copy_blocks(msg.copies)
            continue
        ids = torch.from_numpy(msg.input_ids).to(device)
        positions = torch.from_numpy(msg.positions).to(device)
        rows = None if msg.logits_indices is None else torch.from_numpy(msg.logits_indices).to(device)
        received = contextlib.nullcontext()
        if stage > 0:  # the previous stage's hidden states
            hidden = torch.empty((*ids.shape, hidden_size), dtype=dtype, device=device)
            dist.recv(hidden, rank - spec.tp)
            received = stage_input(hidden)
        if msg.metadata is None:  # whole sequences: CompiledModel makes a scratch cache
            scope = contextlib.nullcontext()
        else:
            if msg.cache != cache_key:  # rank 0 runs on another cache now: the same one here
                attn = compiled.attention
                cache = metadata = None
                cache_dtype, scales = _cache_format(spec, attn, rank, kv_scales) if msg.cache[3] in QUANTIZED \
                    else (attn.dtype, None)  # an unquantized scratch cache (calibration, whole sequences)
                cache = PagedKVCache.allocate(attn.num_layers, msg.cache[1], msg.cache[2], attn.num_kv_heads,
                                              attn.head_dim, cache_dtype, device, scales)
                metadata = AttentionMetadata(*msg.metadata[0], device)
                cache_key = msg.cache
            metadata.load_state(msg.metadata)
            scope = attention_context(cache, metadata)
        graphs = compiled.decode_graphs() if msg.decode_graphs else contextlib.nullcontext()
        if msg.lora_slot_ids is not None:
            compiled.lora.slot_ids[: len(msg.lora_slot_ids)].copy_(torch.from_numpy(msg.lora_slot_ids))
        if images is not None:  # before the graph replays or the model runs: the splice reads them
            images.fill(*((torch.from_numpy(msg.images[0]), msg.images[1].to(device)) if msg.images is not None
                          else (None, None)))
        with scope, graphs, received, no_adapters(msg.no_adapters), multimodal_context(images):
            out = compiled(ids, positions, rows)
        if spec.pp == 1:
            continue
        if not last:
            sends.append((dist.isend(out.contiguous(), rank + spec.tp), out))
        elif tp_rank == 0 and out.numel():  # the logits, to rank 0 (which samples)
            out = out.float().contiguous()
            sends.append((dist.isend(out, 0), out))
        while sends and (len(sends) > 8 or sends[0][0].is_completed()):
            sends.popleft()[0].wait()


def _image_buffers(compiled, spec: RankSpec, stage: int, device: torch.device) -> MultimodalEmbeddings | None:
    """The buffers a first-stage rank of a multimodal model splices image features from (filled
    from each step's `images`), as large as rank 0's; None for a text model or a later stage."""
    if stage > 0 or not hasattr(compiled.module, "encode_images"):
        return None
    return MultimodalEmbeddings.for_model(compiled.module, spec.max_num_tokens, device)


def _next_step(channel: StepChannel, rank: int):
    """rank 0's next step. Rank 0 gone without a word (it died, or torchrun passed it a SIGTERM)
    closes its connections: a RuntimeError saying so, and a non-zero exit (under torchrun a clean
    one would leave this node's agent waiting at its exit barrier for the agent that is gone)."""
    try:
        return channel.recv()
    except RuntimeError as e:
        raise RuntimeError(f"trtllm rank {rank}: rank 0 is gone ({str(e).splitlines()[0][:200]})") from None


def cache_amax(cache: PagedKVCache) -> torch.Tensor:
    """[L, 2, Hkv] fp32 on the CPU: the largest |K| and |V| in `cache`, per layer and KV head
    (runtime/kv_cache_quant.py's calibration reads its own cache the same way)."""
    return torch.stack([pool.abs().amax(dim=(1, 2, 4)).float().cpu() for pool in (cache.k, cache.v)], dim=1)


def _cache_format(spec: RankSpec, attn, rank: int, kv_scales=None) -> tuple[torch.dtype, torch.Tensor | None]:
    """(dtype, scales) of this rank's KV pool: the model's, or a quantized pool with the given
    scales of its layers and KV heads (`rank_kv_scales`), else (FP8) every scale 1.0 (rank 0's,
    runtime/kv_cache_quant.py, for its own layers and heads)."""
    if spec.kv_cache_dtype == "auto":
        return attn.dtype, None
    scales = rank_kv_scales(kv_scales, spec, rank)
    return KV_CACHE_DTYPES[spec.kv_cache_dtype], \
        scales if scales is not None else torch.ones((attn.num_layers, 2, attn.num_kv_heads))


def _kv_blocks(compiled, msg: KvBlocks, device: torch.device, cache_dtype: torch.dtype) -> int | None:
    """KV blocks of this rank's layers and heads that fit msg.fraction of its free memory (what
    the profiling step left cached counts as used: its activations), None off a GPU."""
    if device.type != "cuda":
        return None
    from trtllm.runtime.kv_budget import blocks_in
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    return blocks_in(free * msg.fraction, compiled, msg.block_size, cache_dtype)
