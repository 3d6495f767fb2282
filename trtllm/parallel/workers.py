"""Rank 0's side of a parallel LLM (tensor and pipeline parallel): start the workers (ranks
1..N-1 on this node, spawn; or join those torchrun started), hand them every model call, pass a
first stage's output on and take the logits back from the last, name the rank that failed a
step, end them all.

    compiled, workers = start_parallel(spec)   # loads and compiles rank 0 too
    ... compiled(...)                          # every rank runs the call (send_step)
    workers.shutdown()

What cannot run is refused before any process starts (parallel/checks.py). A worker that dies while loading fails the start, naming its
rank; one that dies later fails the step that needed it (its collective errors or times out)
with an error naming the rank, and every later step at once.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from trtllm.attention_context import active_context, in_attention_context
from trtllm.compile import CompiledModel
from trtllm.kernels.linear_lora import adapters_off
from trtllm.lora_request import LoRARequest
from trtllm.lora_slots import LoraSlots
from trtllm.multimodal_context import active_embeddings
from trtllm.parallel import process_group
from trtllm.parallel.rank_model import RankSpec, compile_rank, load_rank, loaded_bytes, rank_device
from trtllm.parallel.step_channel import StepChannel
from trtllm.parallel.worker import (
    KV_AMAX,
    LORA_MODULES,
    REPORT,
    CopyBlocks,
    KvBlocks,
    KvScales,
    LoadAdapter,
    LoraModules,
    Step,
    worker_main,
)

# How long a worker may take to load its weights (rank 0 meanwhile loads its own).
LOAD_TIMEOUT_S = 600.0
SHUTDOWN_TIMEOUT_S = 10.0


class RankFailed(RuntimeError):
    """A parallel rank died, failed, or did not answer."""


def start_parallel(spec: RankSpec) -> tuple[CompiledModel, Workers]:
    """Rank 0's compiled model, its workers started (spawn) or joined (under torchrun)."""
    workers = Workers(spec)
    try:
        device = rank_device(spec, 0, 0 if workers.torchrun else None)
        model, slices = load_rank(spec, 0, device)
        workers.wait_loaded()
        groups = process_group.join(0, spec.world, workers.init_method, device, spec.timeout_s, spec.tp)
        workers.channel = StepChannel(groups.control, 0)
        compiled = compile_rank(model, slices, spec, 0, groups, workers=workers)
        workers.rank0_bytes = lambda: loaded_bytes(model, slices)
        workers.logits_width = _logits_width(model)
        return compiled, workers
    except BaseException:
        workers.shutdown()
        raise


def _logits_width(model) -> int:
    head = getattr(model, "lm_head", None)
    return head.out_features if head is not None else model.config.vocab_size


class _PendingLogits:
    """The logits of a step whose later stages still run: `synchronize()` waits for the last
    stage's send (what LaunchedStep.wait calls), naming the rank that failed it."""

    def __init__(self, work, workers: Workers):
        self.work, self.workers = work, workers

    def synchronize(self) -> None:
        if self.work is None:
            return
        work, self.work = self.work, None
        try:  # a hung later stage: this recv times out as a collective does
            work.wait(timedelta(seconds=self.workers.spec.timeout_s))
        except Exception as e:  # noqa: BLE001 - named, then raised
            raise self.workers.failure(e) from e


class Workers:
    def __init__(self, spec: RankSpec):
        self.spec = spec
        self.torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # the ranks torchrun started
        self._dir = None
        self.rank0_bytes = None
        self.channel: StepChannel | None = None
        self.logits_width = 0
        self.processes, self.conns = {}, {}
        self._sends: list = []  # (work, tensor) of hidden states sent to stage 1, until done
        self._errors: dict[int, str] = {}
        self._down = False
        # set by the first failed call: the ranks may be at different collectives now, so
        # pairing later calls' collectives could sum the wrong tensors; every later call fails
        self.broken: RankFailed | None = None
        self.what = "tensor-parallel" if spec.pp == 1 else "parallel"
        if self.torchrun:
            if int(os.environ["RANK"]) != 0 or int(os.environ["WORLD_SIZE"]) != spec.world:
                raise ValueError(f"under torchrun the LLM runs on rank 0 of WORLD_SIZE={spec.world} "
                                 f"(tensor_parallel_size x pipeline_parallel_size); this is RANK="
                                 f"{os.environ['RANK']} of WORLD_SIZE={os.environ['WORLD_SIZE']}")
            self.init_method = "env://"
            return
        self._dir = tempfile.TemporaryDirectory(prefix="trtllm-parallel-")
        self.init_method = f"file://{self._dir.name}/rendezvous"
        ctx = mp.get_context("spawn")
        os.environ.update(process_group.NO_MULTICAST_ENV)  # the workers inherit it
        for rank in range(1, spec.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, spec, self.init_method, child),
                               name=f"trtllm-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.processes[rank], self.conns[rank] = proc, parent

    # -- start -------------------------------------------------------------------------
    def wait_loaded(self, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        for rank in self.processes:
            self._expect(rank, "loaded", timeout_s)

    def _expect(self, rank: int, kind: str, timeout_s: float):
        conn, proc = self.conns[rank], self.processes[rank]
        deadline = time.monotonic() + timeout_s
        while not conn.poll(0.05):
            if not proc.is_alive() and not conn.poll(0):
                raise RankFailed(self._dead(rank))
            if time.monotonic() > deadline:
                raise RankFailed(f"{self.what} rank {rank} did not answer within {timeout_s:.0f} s")
        try:
            got, payload = conn.recv()
        except (EOFError, OSError):
            raise RankFailed(self._dead(rank)) from None
        if got == "error":
            self._errors[rank] = payload
            raise RankFailed(f"{self.what} rank {rank} failed: {payload}")
        if got != kind:
            raise RankFailed(f"{self.what} rank {rank} answered {got!r}, expected {kind!r}")
        return payload

    def _dead(self, rank: int) -> str:
        proc = self.processes[rank]
        proc.join(1.0)
        why = self._errors.get(rank)
        if why is None and self.conns[rank].poll(0):
            with contextlib.suppress(EOFError, OSError, ValueError):
                got, payload = self.conns[rank].recv()
                why = payload if got == "error" else None
        if why is not None:
            self._errors[rank] = why
            return f"{self.what} rank {rank} failed: {why}"
        return f"{self.what} rank {rank} died (exit code {proc.exitcode})"

    # -- steps -------------------------------------------------------------------------
    def send_step(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor | None,
                  decode_graphs: bool, lora: LoraSlots | None = None) -> None:
        """Hand one call of rank 0's CompiledModel to every worker (before rank 0 runs it), with
        each token's LoRA slot (`lora`: rank 0's slots, filled by the runner) and the image features
        staged for its image tokens (rank 0 alone encodes images: the features go by value)."""
        self.check_alive()
        metadata = cache = None
        if in_attention_context():
            ctx = active_context()
            metadata = ctx.metadata.state()
            cache = (id(ctx.cache), ctx.cache.num_blocks, ctx.cache.block_size, str(ctx.cache.k.dtype))
        slot_ids = None if lora is None else lora.slot_ids[: input_ids.numel()].cpu().numpy()
        mm = active_embeddings()  # a multimodal model's step: the image features rank 0 staged
        images = None if mm is None or mm.staged is None else (mm.staged[0].numpy(), mm.staged[1].cpu())
        step = Step(input_ids.cpu().numpy(), positions.cpu().numpy(),
                    None if logits_indices is None else logits_indices.cpu().numpy(), metadata, cache, decode_graphs,
                    slot_ids, adapters_off(), images)
        self._send(step)

    def load_adapter(self, slot: int, request: LoRARequest) -> None:
        """Rank 0 put `request`'s adapter into LoRA slot `slot`: every worker writes its part there
        (before the step that reads it). ValueError naming the rank where one could not read it."""
        self.check_alive()
        self._send(LoadAdapter(slot, request))
        failures = [(rank, why) for rank, why in enumerate(self.channel.gather(None)) if why is not None]
        if failures:
            rank, why = failures[0]
            raise ValueError(f"rank {rank}: {why}")

    def share_lora_modules(self, lora: LoraSlots) -> None:
        """Every rank's wrapped linears, gathered and shared (after the first compilation): each
        rank's `LoraSlots.elsewhere` lists the others', so an adapter is checked against the
        whole model (a pipeline stage wraps its own layers only)."""
        self.check_alive()
        self._send(LORA_MODULES)
        modules = {}
        for wrapped in self.channel.gather(lora.wrapped()):
            modules.update(wrapped)
        lora.elsewhere = {p: f for p, f in modules.items() if p not in lora.modules}
        self._send(LoraModules(modules))

    def _send(self, msg) -> None:
        try:
            self.channel.send(msg)
        except RuntimeError as e:
            raise self.failure(e) from e

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Beam search's copy-on-write blocks, into every worker's cache (before the next step)."""
        self.check_alive()
        self._send(CopyBlocks(list(copies)))

    def pass_on(self, hidden: torch.Tensor, input_ids: torch.Tensor, logits_indices: torch.Tensor | None):
        """A first stage's output to the next stage (same tensor-parallel rank), and the buffer the
        last stage's logits will arrive in with what to wait for: ([N or B, S, V] fp32, pending)."""
        hidden = hidden.contiguous()
        self._sends.append((dist.isend(hidden, self.spec.tp), hidden))
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        rows = (*input_ids.shape,) if logits_indices is None else (logits_indices.numel(),)
        logits = torch.empty((*rows, self.logits_width), dtype=torch.float32, device=hidden.device)
        if logits.numel() == 0:
            return logits, None
        return logits, _PendingLogits(dist.irecv(logits, (self.spec.pp - 1) * self.spec.tp), self)

    def check_alive(self) -> None:
        if self._down:
            raise RankFailed(f"the {self.what} workers were shut down")
        if self.broken is not None:
            raise RankFailed(f"a {self.what} call failed earlier ({self.broken}); build a new LLM")
        dead = [rank for rank, proc in self.processes.items() if not proc.is_alive()]
        if dead:
            raise RankFailed("; ".join(self._dead(rank) for rank in dead))

    def failure(self, error: Exception, wait_s: float = 5.0) -> Exception:
        """What a call that raised on rank 0 says: the rank that died or failed, if one did
        (it may take a moment to exit after breaking the collective). Every later call fails."""
        if isinstance(error, RankFailed):
            return error
        found = self._failure(error, wait_s)
        self.broken = found if isinstance(found, RankFailed) else RankFailed(f"rank 0: {type(error).__name__}: {error}")
        return found

    def _failure(self, error: Exception, wait_s: float) -> Exception:
        deadline = time.monotonic() + (wait_s if self.processes else 0)
        while time.monotonic() < deadline:
            dead = [rank for rank, proc in self.processes.items() if not proc.is_alive()]
            if dead:
                return RankFailed("; ".join(self._dead(rank) for rank in dead) + f" (rank 0: {error})")
            time.sleep(0.05)
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            # every rank alive: a rank that reported no error of its own is the one that hangs
            silent = [rank for rank, conn in self.conns.items() if not conn.poll(0)]
            return RankFailed(f"{self.what} rank {', '.join(map(str, silent)) or '?'} did not join a collective "
                              f"within {self.spec.timeout_s:.0f} s (hung; rank 0: {error})")
        if self.torchrun:
            return RankFailed(f"a {self.what} rank of the torchrun group failed (rank 0: {error})")
        return error

    def loaded_bytes(self) -> list[int]:
        """Bytes of weights each rank read, rank 0 first (after the first call: slices are
        read when the pass runs)."""
        self.check_alive()
        self._send(REPORT)
        got = self.channel.gather(self.rank0_bytes())
        return list(got)

    def kv_amax(self, rank0: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's [L, 2, Hkv] largest |K| and |V| in the cache of its last step, rank 0's
        (`rank0`) first (parallel/kv_calibration.py)."""
        self.check_alive()
        self._send(KV_AMAX)
        return list(self.channel.gather(rank0))

    def set_kv_scales(self, scales: torch.Tensor) -> None:
        """The whole model's calibrated KV scales [L, 2, Hkv], for every worker's quantized caches."""
        self.check_alive()
        self._send(KvScales(scales))

    def min_kv_blocks(self, fraction: float, block_size: int) -> int | None:
        """The fewest KV blocks any worker's free GPU memory holds (None off a GPU)."""
        self.check_alive()
        self._send(KvBlocks(fraction, block_size))
        got = [n for n in self.channel.gather(None)[1:] if n is not None]
        return min(got) if got else None

    # -- end ---------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """End every worker (asked, then terminated, then killed) and leave the groups."""
        if self._down:
            return
        self._down = True
        if self.channel is not None and self.broken is None and \
                all(proc.is_alive() for proc in self.processes.values()):
            with contextlib.suppress(Exception):
                self.channel.send(None)
                self.channel.flush()
        deadline = time.monotonic() + timeout_s
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns.values():
            conn.close()
        process_group.leave()
        if self._dir is not None:
            self._dir.cleanup()
