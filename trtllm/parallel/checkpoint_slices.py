"""A tensor-parallel rank's weight slices, read from the safetensors files: the rank loads
the model with the split weights left unloaded (models/loader.py `leave_unloaded`), and
passes/shard_tensor_parallel.py reads each slice it keeps through `CheckpointSlices`.

    slices = CheckpointSlices(path)
    model = load_model(path, dtype, device, leave_unloaded=is_split)
    w = slices("model.layers.0.self_attn.q_proj.weight", stand_in, dim=0, start=64, length=64)

Only the slice is read from disk (safetensors `get_slice`), never the whole tensor; it gets
the stand-in's dtype and device. `bytes_read` counts what was read.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from trtllm.models.checkpoint_config import read_json
from trtllm.models.checkpoint_tensors import check_finite
from trtllm.passes.shard_tensor_parallel import COLUMN_PARALLEL, FUSED_COLUMN_PARALLEL, ROW_PARALLEL

# split by vocabulary rows (passes/shard_vocab_parallel.py)
VOCAB_PARALLEL = ("embed_tokens", "lm_head")


def is_split(name: str) -> bool:
    """Whether the passes split the tensor `name`: column-parallel weights and biases (also of
    the fused projections the pass splits into parts),
    row-parallel weights (their bias is added whole, after the all-reduce), and the embedding
    and LM head (by vocabulary)."""
    module, _, leaf = name.rpartition(".")
    projection = module.rpartition(".")[2]
    return ((projection in COLUMN_PARALLEL or projection in FUSED_COLUMN_PARALLEL) and leaf in ("weight", "bias")) or \
        (projection in ROW_PARALLEL and leaf == "weight") or \
        (projection in VOCAB_PARALLEL and leaf in ("weight", "bias"))


class CheckpointSlices:
    def __init__(self, path: str | os.PathLike, rename: Callable[[str], str] | None = None):
        """`rename`: a checkpoint name -> the model's (a model file's `checkpoint_name`), so a
        slice is asked for by the module's name whatever the checkpoint's layout."""
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.path / file for name, file in read_json(index)["weight_map"].items()}
        else:
            single = self.path / "model.safetensors"
            with safe_open(str(single), framework="pt", device="cpu") as f:
                self.files = {name: single for name in f.keys()}
        self._stored_names = {rename(n): n for n in self.files} if rename is not None else {}
        self.bytes_read = 0
        self.bytes_scanned = 0  # whole tensors read for their FP8 scales and dropped (`whole`)
        self.read_experts = None  # an HF MoE rank's expert reader (parallel/expert_checkpoint.py), if any

    def __call__(self, name: str, stand_in: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
        name = self._stored(name)
        with safe_open(str(self.files[name]), framework="pt", device="cpu") as f:
            tensor = f.get_slice(name)
            self._check_shape(name, tensor.get_shape(), stand_in)
            part = tensor[start:start + length] if dim == 0 else tensor[:, start:start + length]
        self.bytes_read += part.numel() * part.element_size()
        return self._checked(name, part, stand_in)

    def whole(self, name: str, stand_in: torch.Tensor) -> torch.Tensor:
        """The whole tensor, for what needs all of it once (an FP8 per-tensor scale: the caller
        keeps its slice, quantization/fp8_slices.py); counted in `bytes_scanned`, not `bytes_read`."""
        name = self._stored(name)
        with safe_open(str(self.files[name]), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(name)
        self._check_shape(name, list(tensor.shape), stand_in)
        self.bytes_scanned += tensor.numel() * tensor.element_size()
        return self._checked(name, tensor, stand_in)

    def _checked(self, name: str, read: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
        """`read` in the stand-in's dtype and device, checked as the loader checks what it reads whole:
        an integer tensor for a float weight, NaN or infinities (also made by the cast) are refused."""
        if stand_in.is_floating_point() and not read.is_floating_point():
            raise ValueError(f"{self.files[name].name}: tensor {name!r} is {read.dtype}, but it is a weight: "
                             "weights are floating point")
        out = read.to(device=stand_in.device, dtype=stand_in.dtype).contiguous()
        check_finite(out, name, self.files[name].name, read.dtype)
        return out

    def _stored(self, name: str) -> str:
        name = self._stored_names.get(name, name)
        if name not in self.files and name.startswith("model.") and name[len("model."):] in self.files:
            name = name[len("model."):]  # an HF module runs inside models/hf.py's HFCausalLM, as its `model`
        if name not in self.files:
            raise KeyError(f"{name} is not in the checkpoint {self.path}")
        return name

    @staticmethod
    def _check_shape(name: str, shape, stand_in: torch.Tensor) -> None:
        if list(shape) != list(stand_in.shape):
            raise ValueError(f"{name}: the checkpoint holds shape {list(shape)}, the model expects "
                             f"{list(stand_in.shape)}")
