"""LoRA adapters for an engine: PEFT checkpoints read, checked, cached on the host and in GPU slots.

A PEFT LoRA adapter is a directory with `adapter_config.json` (`r`, `lora_alpha`,
`target_modules`, `use_rslora`, ...) and `adapter_model.safetensors` (per targeted linear
`base_model.model.<module path>.lora_A.weight` [r, K] and `.lora_B.weight` [N, r]). A linear
then computes x @ (W + s * B A)^T with s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA);
s is folded into B when it is read.

`Adapters` (one per engine):
- `check(request)`, at submission: the directory, its config and its tensors' names and shapes
  (the safetensors header only) against the engine: rank <= max_lora_rank, every module one the
  engine wraps (trtllm/lora_slots.py, passes/apply_lora.py), shapes those of the model's
  linears (runtime/peft_config.py: rank_pattern / alpha_pattern honoured). Refused by name: bias,
  DoRA, embedding / LM-head adapters, modules_to_save, base-rewriting inits, other PEFT types. A bad
  adapter raises ValueError and nothing else changes; one id always means the same files.
- a host cache of `max_cpu_loras` adapters, each laid out as a slot holds it (`LoraSlots.image`:
  two copies a group into a slot; pinned on a GPU machine), LRU, read from
  disk on first use;
- `max_loras` GPU slots, LRU: `acquire(seq)` when the scheduler admits a sequence puts its
  adapter in a slot (copied from the host cache) and pins it; `release(seq)` when it finishes or
  is preempted unpins it. A pinned slot is never evicted: `can_admit(seq)` says whether a slot is
  resident or can be freed for it (else the sequence waits).
The model runner reads `slot(seq)` to fill the per-token slot index each step.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from trtllm.lora_config import LoraConfig
from trtllm.lora_request import LoRARequest
from trtllm.lora_slots import DEFAULT_TARGET_MODULES, LoraSlots
from trtllm.runtime.peft_config import check_peft_config, left_out_by_config
from trtllm.runtime.sequence import Sequence

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names
# peft's tensor names, `base_model.model.` + the module path; other tools write the path alone (vLLM reads both)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class PeftAdapter:
    """A checked adapter: where it is, its rank and scaling, and its tensors by module path."""
    request: LoRARequest
    directory: Path
    rank: int  # the largest of its modules'
    scaling: dict[str, float]  # module path -> lora_alpha / r (/ sqrt(r) with rsLoRA), its rank_pattern's and alpha_pattern's
    keys: dict[str, tuple[str, str]]  # module path -> (lora_A key, lora_B key)
    stamp: tuple | None = None  # its files' sizes and modification times when read (files_stamp)


def files_stamp(directory: Path) -> tuple | None:
    """The adapter files' (size, modification time) pairs: another stamp, other files (None: unreadable)."""
    try:
        return tuple((st.st_size, st.st_mtime_ns) for st in ((directory / f).stat() for f in (CONFIG_FILE,
                                                                                               WEIGHTS_FILE)))
    except OSError:
        return None


def read_peft_adapter(request: LoRARequest, slots: LoraSlots) -> PeftAdapter:
    """The adapter at request.lora_path, checked against the engine's slots (ValueError naming
    what is wrong)."""
    name = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    directory = Path(request.lora_path)
    if not directory.is_dir():
        raise ValueError(f"{name}: no such directory")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    stamp = files_stamp(directory)
    if not config_path.is_file():
        raise ValueError(f"{name}: no {CONFIG_FILE}")
    if not weights_path.is_file():
        other = "adapter_model.bin (a pickle; only safetensors is read)" if (directory / "adapter_model.bin").exists() \
            else "no weights file"
        raise ValueError(f"{name}: no {WEIGHTS_FILE}: {other}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: {CONFIG_FILE} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{name}: {CONFIG_FILE} holds a {type(config).__name__}, not a JSON object")
    ranks = check_peft_config(config, name, slots.max_lora_rank)
    keys: dict[str, dict[str, str]] = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: tuple(t.get_shape()) for key, t in slices.items()}
            dtypes = {key: t.get_dtype() for key, t in slices.items()}
    except Exception as e:  # safetensors' own error type: a truncated or corrupt file
        raise ValueError(f"{name}: {WEIGHTS_FILE} is not a readable safetensors file: {e}") from None
    for key in shapes:
        if dtypes[key] not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: tensor {key} is {dtypes[key]}: LoRA weights must be floating point "
                             f"({', '.join(_FLOAT_DTYPES)})")
        match = _KEY.match(key)
        if "lora_embedding" in key or any(f".{m}." in f".{key}" for m in ("lm_head", "embed_tokens")):
            raise ValueError(f"{name}: LM-head and embedding adapters are not supported ({key})")
        if match is None:
            if "lora_magnitude_vector" in key:
                raise ValueError(f"{name}: DoRA is not supported ({key})")
            raise ValueError(f"{name}: tensor {key} is no LoRA A or B weight (bias, or a fully trained module: "
                             "not supported)")
        twin = keys.setdefault(match["path"], {}).setdefault(match["ab"], key)
        if twin != key:
            raise ValueError(f"{name}: {match['path']}'s lora_{match['ab']} is given twice, as {twin} and {key}")
    if not keys:
        raise ValueError(f"{name}: {WEIGHTS_FILE} holds no LoRA weights")
    checked = {}
    for path, ab in sorted(keys.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{name}: {path} has lora_{'A' if 'A' in ab else 'B'} but not the other")
        left_out = left_out_by_config(config, path)
        if left_out:  # PEFT would not apply these weights: applying them would be another model
            raise ValueError(f"{name}: {path} has LoRA weights, but {CONFIG_FILE}'s {left_out} leaves it out "
                             "(PEFT would not apply them): the config and the weights disagree")
        features = slots.features(path)
        if features is None:
            raise ValueError(f"{name}: targets {path}: this engine wraps no such linear (the model lacks it, or "
                             f"lora_target_modules {sorted(slots.target_modules)} leaves it out)")
        a_shape, b_shape = shapes[ab["A"]], shapes[ab["B"]]
        k, n = features
        rank = ranks.rank(path)
        if a_shape != (rank, k) or b_shape != (n, rank):
            # the linear's sizes right and the rank not: the config's r, not another base model
            why = f"adapter_config.json's r={rank} is not the tensors' rank" \
                if len(a_shape) == 2 and a_shape[1:] == (k,) and b_shape == (n, a_shape[0]) \
                else "an adapter of another base model?"
            raise ValueError(f"{name}: {path} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, but the "
                             f"base model's linear there is {k} -> {n} at rank {rank}: lora_A must be [{rank}, {k}], "
                             f"lora_B [{n}, {rank}] ({why})")
        checked[path] = (ab["A"], ab["B"])
    scaling = {path: ranks.scaling(path) for path in checked}
    return PeftAdapter(request, directory, ranks.max_rank, scaling, checked, stamp)


def read_target_modules(directory: str | Path) -> list[str]:
    """The module names an adapter's config targets (for LoraConfig's default); every LoRA
    target for "all-linear" or a regular expression."""
    config_path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise ValueError(f"LoRA adapter {directory}: no such directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"LoRA adapter {directory}: {CONFIG_FILE} is not readable: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {directory}: {CONFIG_FILE} holds a {type(config).__name__}, not a JSON object")
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets:
        return [t.rsplit(".", 1)[-1] for t in targets]
    return list(DEFAULT_TARGET_MODULES)


def read_peft_weights(adapter: PeftAdapter, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's (A [r, K], s * B [N, r]) per module path, in `dtype`, on the host
    (LoraSlots.image lays them out and pins them for a GPU's copies)."""
    weights = {}
    with safe_open(str(adapter.directory / WEIGHTS_FILE), framework="pt") as f:
        for path, (a_key, b_key) in adapter.keys.items():
            a = f.get_tensor(a_key).to(dtype)
            b = (f.get_tensor(b_key).double() * adapter.scaling[path]).to(dtype)
            for key, w in ((a_key, a), (b_key, b)):
                if not torch.isfinite(w).all():  # else every token under the adapter: NaN logits
                    raise ValueError(f"tensor {key} holds NaN or Inf (or overflows {dtype} once scaled)")
            weights[path] = (a, b)
    return weights


class Adapters:
    def __init__(self, config: LoraConfig, slots: LoraSlots, dtype: torch.dtype, replicas=None):
        self.config, self.slots, self.dtype = config, slots, dtype
        # (slot, request) -> None: the other ranks of a parallel engine write their parts of an
        # adapter rank 0 put in a slot (parallel/workers.py `load_adapter`); None: one rank
        self.replicas = replicas
        self._lock = threading.Lock()  # check() runs on the callers' threads, the rest on the engine's
        # by lora_int_id, every id ever checked: one id, one adapter's files (the first request, its
        # directory resolved, files_stamp): a few hundred bytes an id
        self._seen: dict[int, tuple[LoRARequest, Path, tuple | None]] = {}
        # the adapters checked last, LRU first, at most _checked_kept (87 KB each for Llama-8B's 224
        # linears' tensor names: kept for every id they were 870 MB after 10,000 adapters); re-read if need be
        self._checked: OrderedDict[int, PeftAdapter] = OrderedDict()
        self._checked_kept = max(64, 2 * config.max_cpu_loras)
        self._host: OrderedDict[int, list] = OrderedDict()  # adapter id -> its slot image (LoraSlots.image), LRU first
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> GPU slot, LRU first
        self._free_slots = list(range(slots.max_loras))
        self._pins: Counter[int] = Counter()  # adapter id -> sequences admitted with it
        self._held: dict[int, int] = {}  # seq_id -> adapter id it pins
        # counters (what /metrics and the bench read)
        self.slot_loads = 0
        self.disk_loads = 0

    # -- at submission -------------------------------------------------------------------
    def check(self, request: LoRARequest) -> PeftAdapter:
        """The adapter `request` names, checked (ValueError naming the problem)."""
        if not isinstance(request, LoRARequest):
            kind = type(request)  # (vLLM's and TensorRT-LLM's classes have our class's name)
            raise TypeError(f"lora_request must be a trtllm.LoRARequest, got {kind.__module__}.{kind.__qualname__} "
                            "(build one: trtllm.LoRARequest(lora_name, lora_int_id, lora_path))")
        adapter_id = request.lora_int_id
        with self._lock:
            seen, known = self._seen.get(adapter_id), self._checked.get(adapter_id)
        if seen is not None:
            _check_identity(request, *seen)
            if known is not None:
                with self._lock:
                    if adapter_id in self._checked:
                        self._checked.move_to_end(adapter_id)
                return known
        adapter = read_peft_adapter(request, self.slots)
        with self._lock:
            seen = self._seen.setdefault(adapter_id, (request, _absolute(adapter.directory), adapter.stamp))
        _check_identity(request, *seen)  # (another thread may have checked the id first)
        with self._lock:
            self._checked[adapter_id] = adapter
            self._checked.move_to_end(adapter_id)
            while len(self._checked) > self._checked_kept:
                self._checked.popitem(last=False)
        return adapter

    # -- the scheduler's side ----------------------------------------------------------------
    def can_admit(self, seq: Sequence) -> bool:
        """Whether `seq`'s adapter is in a slot, or one can be had for it now."""
        adapter_id = _adapter_id(seq)
        if adapter_id is None or adapter_id in self._slot_of or self._free_slots:
            return True
        return any(self._pins[i] == 0 for i in self._slot_of)

    def none_admissible(self, seqs) -> bool:
        """Whether no sequence of `seqs` can be admitted before a running one finishes: every
        GPU slot pinned by running sequences' adapters (none free), and each of `seqs` has an
        adapter that is not in one. (can_admit per sequence scans the slots for each.)"""
        if self._free_slots or any(self._pins[i] == 0 for i in self._slot_of):
            return False
        return not any(_adapter_id(s) is None or _adapter_id(s) in self._slot_of for s in seqs)

    def acquire(self, seq: Sequence) -> None:
        """Pin `seq`'s adapter in a GPU slot (loading it there if need be). ValueError if its
        files cannot be read any more; RuntimeError if no slot is free (ask can_admit)."""
        adapter_id = _adapter_id(seq)
        if adapter_id is None or seq.seq_id in self._held:
            return
        if adapter_id in self._slot_of:
            self._slot_of.move_to_end(adapter_id)
        else:
            image = self.host_image(seq.lora_request)
            slot = self._take_slot()
            # queued on the step stream, after any step still reading the slot's old adapter
            # (whose sequences have all finished: it was unpinned); not waited for
            self.slots.load_image(slot, image)
            if self.replicas is not None:
                try:
                    self.replicas(slot, seq.lora_request)
                except ValueError:  # another rank could not read it: the slot holds no adapter now
                    self._free_slots.append(slot)
                    raise
            self.slot_loads += 1
            self._slot_of[adapter_id] = slot
        self._pins[adapter_id] += 1
        self._held[seq.seq_id] = adapter_id

    def release(self, seq: Sequence) -> None:
        adapter_id = self._held.pop(seq.seq_id, None)
        if adapter_id is not None:
            self._pins[adapter_id] -= 1

    def slot(self, seq: Sequence) -> int:
        """The GPU slot of `seq`'s adapter (-1: none). The sequence must have been acquired."""
        adapter_id = self._held.get(seq.seq_id)
        return -1 if adapter_id is None else self._slot_of[adapter_id]

    # -- caches -------------------------------------------------------------------------------
    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop(0)
        victim = next((i for i in self._slot_of if self._pins[i] == 0), None)  # least recently used first
        if victim is None:
            raise RuntimeError("every LoRA slot is pinned by a running sequence (the scheduler asks can_admit)")
        return self._slot_of.pop(victim)

    def host_image(self, request: LoRARequest) -> list:
        """The adapter laid out as a slot holds it (LoraSlots.image), from the host cache or
        read into it."""
        adapter_id = request.lora_int_id
        with self._lock:
            image = self._host.get(adapter_id)
            if image is not None:
                self._host.move_to_end(adapter_id)
                return image
        adapter = self.check(request)  # on a miss: files changed since they were first read are refused
        try:
            image = self.slots.image(read_peft_weights(adapter, self.dtype),
                                     pin=self.slots.device.type == "cuda")
        except Exception as e:  # the files changed or went away since check()
            raise ValueError(f"LoRA adapter {request.lora_name!r} ({request.lora_path}) could not be read: "
                             f"{type(e).__name__}: {e}") from None
        with self._lock:
            self.disk_loads += 1
            self._host[adapter_id] = image
            while len(self._host) > self.config.max_cpu_loras:
                self._host.popitem(last=False)
        return image

    @property
    def resident(self) -> list[int]:
        """Adapter ids in GPU slots, least recently used first."""
        return list(self._slot_of)

    @property
    def cached(self) -> list[int]:
        """Adapter ids in the host cache, least recently used first."""
        with self._lock:
            return list(self._host)


def _check_identity(request: LoRARequest, first: LoRARequest, directory: Path, stamp: tuple | None) -> None:
    """ValueError unless `request` names the files its id was first checked with, unchanged."""
    if _absolute(request.lora_path) != directory:
        raise ValueError(f"LoRA adapter id {request.lora_int_id} is {first.lora_name!r} ({first.lora_path}) in this "
                         f"engine; {request.lora_name!r} ({request.lora_path}) needs an id of its own")
    if files_stamp(directory) != stamp:  # its slot, host copy and KV blocks hold the old files'
        raise ValueError(f"LoRA adapter {request.lora_name!r} ({request.lora_path}): its files changed since the "
                         f"engine first read them as id {request.lora_int_id}; give the changed adapter an id of its "
                         "own, or restart trtllm-serve (the id keys its cached copies and prefix-cache blocks)")


def _absolute(path) -> Path:
    """`path` made absolute and normalized (./, a trailing /), its links kept: a link moved to other
    files is the files' stamp's business (files_stamp), not another adapter."""
    return Path(os.path.abspath(path))


def _adapter_id(seq: Sequence) -> int | None:
    return seq.lora_request.lora_int_id if seq.lora_request is not None else None
