"""Rank 0's side of a tensor-parallel LLM on one node: start the workers (ranks 1..N-1, spawn),
send them every model call, name the rank that failed a step, end them all.

    compiled, workers = start_tensor_parallel(spec)   # loads and compiles rank 0 too
    ... compiled(...)                                 # every rank runs the call (send_step)
    workers.shutdown()

Sizes that do not divide (heads, KV heads, MLP width), more ranks than GPUs, and architectures
outside TENSOR_PARALLEL_ARCHITECTURES are refused before any process starts. A worker that dies
while loading fails the start, naming its rank; one that dies later fails the step that
needed it (its all-reduce errors or times out) with an error naming the rank, and every
later step at once.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import torch

from trtllm.attention_context import active_context, in_attention_context
from trtllm.compile import CompiledModel
from trtllm.models import gemma, llama
from trtllm.models.loader import ARCHITECTURES, read_json
from trtllm.parallel import process_group
from trtllm.parallel.expert_checkpoint import EXPERT_NAMES, check_moe_config
from trtllm.parallel.expert_parallel import ExpertParallel, check_vocab
from trtllm.parallel.rank_model import RankSpec, compile_rank, load_rank, loaded_bytes, rank_device
from trtllm.parallel.tensor_parallel import check_sizes
from trtllm.parallel.worker import REPORT, Step, worker_main

# Model files whose projections the pass splits (tested on 2 and 4 ranks: tests/parallel). Phi-3's
# fused qkv_proj / gate_up_proj are not split yet; HF-module families load whole (models/hf.py).
TENSOR_PARALLEL_ARCHITECTURES = llama.HF_ARCHITECTURES + gemma.HF_ARCHITECTURES

# How long a worker may take to load its slices (rank 0 meanwhile loads its own).
LOAD_TIMEOUT_S = 600.0
SHUTDOWN_TIMEOUT_S = 10.0


class RankFailed(RuntimeError):
    """A tensor-parallel rank died, failed, or did not answer."""


def check_tensor_parallel(path: str | os.PathLike, world: int, device_type: str,
                          moe_expert_parallel_size: int = 1) -> None:
    """Refuse, naming the numbers, what cannot run on `world` ranks; before any process starts."""
    config = read_json(Path(path) / "config.json")
    arch = (config.get("architectures") or ["?"])[0]
    moe = ExpertParallel(moe_expert_parallel_size, world // moe_expert_parallel_size)
    if moe.moe_ep > 1 and arch not in EXPERT_NAMES:
        raise ValueError(f"moe_expert_parallel_size={moe.moe_ep}: {arch} is not a mixture-of-experts model "
                         f"supported under expert parallelism (supported: {', '.join(EXPERT_NAMES)})")
    if arch not in TENSOR_PARALLEL_ARCHITECTURES and arch not in EXPERT_NAMES:
        raise ValueError(f"tensor_parallel_size={world}: {arch} is not supported under tensor parallelism yet "
                         f"(supported: {', '.join(TENSOR_PARALLEL_ARCHITECTURES + tuple(EXPERT_NAMES))})")
    if config.get("quantization_config") or (Path(path) / "hf_quant_config.json").exists():
        raise ValueError(f"tensor_parallel_size={world}: pre-quantized checkpoints are not supported under tensor "
                         "parallelism yet")
    if arch in EXPERT_NAMES:  # an HF module (models/hf.py): its config.json read as it is
        check_moe_config(config, moe)
    else:
        model_cls = ARCHITECTURES[arch]
        c = model_cls.config_class.from_hf(config)
        check_sizes(world, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                    intermediate_size=c.intermediate_size)
        check_vocab(c.vocab_size, world)
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs; {torch.cuda.device_count()} visible")


def start_tensor_parallel(spec: RankSpec) -> tuple[CompiledModel, Workers]:
    check_tensor_parallel(spec.path, spec.world, spec.device_type, spec.moe_expert_parallel_size)
    workers = Workers(spec)
    try:
        device = rank_device(spec, 0)
        model, slices = load_rank(spec, device)
        workers.wait_loaded()
        group_name = process_group.join(0, spec.world, workers.init_method, device, spec.timeout_s)
        compiled = compile_rank(model, slices, spec, 0, group_name, workers=workers)
        workers.rank0_bytes = lambda: loaded_bytes(model, slices)
        return compiled, workers
    except BaseException:
        workers.shutdown()
        raise


class Workers:
    def __init__(self, spec: RankSpec):
        self.spec = spec
        self._dir = tempfile.TemporaryDirectory(prefix="trtllm-tp-")
        self.init_method = f"file://{self._dir.name}/rendezvous"
        self.rank0_bytes = None
        ctx = mp.get_context("spawn")
        os.environ.update(process_group.NO_MULTICAST_ENV)  # the workers inherit it
        self.processes, self.conns = {}, {}
        for rank in range(1, spec.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, spec, self.init_method, child),
                               name=f"trtllm-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.processes[rank], self.conns[rank] = proc, parent
        self._errors: dict[int, str] = {}
        self._down = False
        # set by the first failed call: the ranks may be at different collectives now, so
        # pairing later calls' collectives could sum the wrong tensors; every later call fails
        self.broken: RankFailed | None = None

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
                raise RankFailed(f"tensor-parallel rank {rank} did not answer within {timeout_s:.0f} s")
        try:
            got, payload = conn.recv()
        except (EOFError, OSError):
            raise RankFailed(self._dead(rank)) from None
        if got == "error":
            self._errors[rank] = payload
            raise RankFailed(f"tensor-parallel rank {rank} failed: {payload}")
        if got != kind:
            raise RankFailed(f"tensor-parallel rank {rank} answered {got!r}, expected {kind!r}")
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
            return f"tensor-parallel rank {rank} failed: {why}"
        return f"tensor-parallel rank {rank} died (exit code {proc.exitcode})"

    # -- steps -------------------------------------------------------------------------
    def send_step(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor | None,
                  decode_graphs: bool) -> None:
        """Hand one call of rank 0's CompiledModel to every worker (before rank 0 runs it)."""
        self.check_alive()
        metadata = cache = None
        if in_attention_context():
            ctx = active_context()
            metadata = ctx.metadata.state()
            cache = (id(ctx.cache), ctx.cache.num_blocks, ctx.cache.block_size)
        step = Step(input_ids.cpu().numpy(), positions.cpu().numpy(),
                    None if logits_indices is None else logits_indices.cpu().numpy(), metadata, cache, decode_graphs)
        for rank, conn in self.conns.items():
            try:
                conn.send(step)
            except OSError:
                raise RankFailed(self._dead(rank)) from None

    def check_alive(self) -> None:
        if self._down:
            raise RankFailed("the tensor-parallel workers were shut down")
        if self.broken is not None:
            raise RankFailed(f"a tensor-parallel call failed earlier ({self.broken}); build a new LLM")
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
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            dead = [rank for rank, proc in self.processes.items() if not proc.is_alive()]
            if dead:
                return RankFailed("; ".join(self._dead(rank) for rank in dead) + f" (rank 0: {error})")
            time.sleep(0.05)
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            # every rank alive: a rank that reported no error of its own is the one that hangs
            silent = [rank for rank, conn in self.conns.items() if not conn.poll(0)]
            return RankFailed(f"tensor-parallel rank {', '.join(map(str, silent)) or '?'} did not join a collective "
                              f"within {self.spec.timeout_s:.0f} s (hung; rank 0: {error})")
        return error

    def loaded_bytes(self, timeout_s: float = 60.0) -> list[int]:
        """Bytes of weights each rank read, rank 0 first (after the first call: slices are
        read when the pass runs)."""
        result = [self.rank0_bytes()]
        for rank, conn in self.conns.items():
            conn.send(REPORT)
            result.append(self._expect(rank, "bytes", timeout_s))
        return result

    # -- end ---------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """End every worker (asked, then terminated, then killed) and leave the group."""
        if self._down:
            return
        self._down = True
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.send(None)
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
        self._dir.cleanup()
