"""A checkpoint directory's safetensors files and the tensors in them, read from their headers:
which files (`weight_files`), which tensors the model needs (`expected_tensors`), whether the
checkpoint holds them at the right shapes (`check_checkpoint`); errors name the file and tensor.
models/loader.py streams the weights in once these have passed."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from trtllm.models.checkpoint_config import read_json
from trtllm.models.expert_tensors import ExpertSlots

# Tensors some checkpoints carry that no model needs (old HF rope caches).
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq|cos_cached|sin_cached)$")
_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale", ".k_scale", ".v_scale")
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")


@contextlib.contextmanager
def open_safetensors(file: Path):
    """safe_open, with errors that name the file (a truncated or corrupt shard says only
    'incomplete metadata' otherwise)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e}); the file may be "
                         "truncated or corrupt") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint, in order; errors name what is missing."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise ValueError(f"{index}: no \"weight_map\" object (tensor name -> shard file)")
        weight_map = weight_map["weight_map"]
        not_names = {k: v for k, v in weight_map.items() if not isinstance(v, str)}
        if not_names:
            raise ValueError(f"{index}: weight_map's shard file names must be strings: {str(not_names)[:200]}")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file} is listed in {index.name} but missing on disk")
        return files
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles:
        raise ValueError(
            f"{path} holds only pickle checkpoint files ({', '.join(pickles)}): pickle checkpoints are "
            "never unpickled (that can run arbitrary code). Convert to safetensors, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)`.")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def expected_tensors(model: nn.Module) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """(name -> shape of every tensor the checkpoint must supply, alias name -> tied target name)."""
    targets = {id(p): n for n, p in model.named_parameters()}  # deduplicated: first name wins
    expected, aliases = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in targets and targets[id(t)] != name:
            aliases[name] = targets[id(t)]
        else:
            expected[name] = t.shape
    return expected, aliases


def check_checkpoint(files: list[Path], expected: dict, aliases: dict, is_scale=None,
                      rename=lambda name: name, expert_slot: ExpertSlots | None = None) -> dict[str, Path]:
    """Match checkpoint tensors (names and shapes, read from headers only) to the model's;
    `is_scale(name)` names the quantized layout's extra tensors (checked when read);
    `rename`: a checkpoint name -> the model's (a model file's `checkpoint_name`);
    `expert_slot`: per-expert tensors that make 3-D parameters (each expert's every row block
    must be there)."""
    tensor_file, unexpected, seen = {}, [], {}
    filled: dict[str, set[tuple[int, int]]] = {}
    for file in files:
        with open_safetensors(file) as f:
            for stored in f.keys():
                name = rename(stored)
                if name in seen:  # the loader would take whichever shard it read last
                    raise ValueError(f"tensor {name!r} is stored twice, in {seen[name].name} and in {file.name}: "
                                     "which one is the model's is not said")
                seen[name] = file
                shape = torch.Size(f.get_slice(stored).get_shape())
                slot = expert_slot(name) if expert_slot is not None else None
                if slot is not None and slot[0] in expected:
                    param, e, rows = slot
                    want = expert_slot.shape(expected[param], param)
                    if not 0 <= e < expected[param][0]:
                        raise ValueError(f"{file.name}: tensor {name!r} is expert {e}, but config.json gives "
                                         f"{expected[param][0]} experts (0..{expected[param][0] - 1})")
                    if shape != want:
                        raise ValueError(f"{file.name}: tensor {name!r} has shape {tuple(shape)}, the model expects "
                                         f"{tuple(want)}")
                    filled.setdefault(param, set()).add((e, rows))
                    continue
                if name in expected:
                    if shape != expected[name]:
                        raise ValueError(f"{file.name}: tensor {name!r} has shape {tuple(shape)}, "
                                         f"the model expects {tuple(expected[name])}")
                    tensor_file[name] = file
                elif name in aliases or _HARMLESS.search(name):
                    continue  # e.g. a tied lm_head.weight saved anyway; the tie wins
                elif is_scale is not None and is_scale(name):
                    tensor_file[name] = file
                else:
                    unexpected.append(f"{name} (in {file.name})")
    for param in expert_slot.complete(filled, expected) if expert_slot is not None else []:
        tensor_file[param] = files[0]  # stacked from the per-expert tensors
    missing = [n for n in expected if n not in tensor_file]
    if missing:
        raise ValueError(f"tensors expected by the model are absent from the checkpoint "
                         f"({', '.join(f.name for f in files)}): {missing}")
    if unexpected:
        scales = is_scale is None and any(n.split(" ")[0].endswith(_SCALE_SUFFIXES) for n in unexpected)
        hint = (": quantization scales, but config.json has no quantization_config and there is no "
                "hf_quant_config.json (docs/quantization.md)") if scales else ""
        raise ValueError(f"checkpoint has tensors the model does not use{hint}: {unexpected}")
    return tensor_file


def check_stored_ties(files: list[Path], aliases: dict[str, str], rename=lambda name: name) -> None:
    """ValueError where the model ties a tensor to another (`aliases`: lm_head.weight ->
    embed_tokens.weight under config.json's tie_word_embeddings) but the checkpoint stores it with
    other values: the tie would drop the stored head silently, where transformers keeps it (and
    unties). A head saved anyway with the embedding's values, as save_pretrained may, is fine."""
    stored: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as f:
            stored.update({rename(name): file for name in f.keys()})
    for alias, target in aliases.items():
        if alias not in stored or target not in stored:
            continue
        with open_safetensors(stored[alias]) as f:
            head = f.get_tensor(next(n for n in f.keys() if rename(n) == alias))
        with open_safetensors(stored[target]) as f:
            tied = f.get_tensor(next(n for n in f.keys() if rename(n) == target))
        if head.shape != tied.shape or not torch.equal(head.to(tied.dtype), tied):
            raise ValueError(f"config.json ties {alias} to {target} (tie_word_embeddings), but the checkpoint "
                             f"stores {alias} with other values ({stored[alias].name}): set tie_word_embeddings "
                             f"to false to use the stored {alias} (as transformers does), or leave it out of the "
                             "checkpoint to tie")


def check_finite(t: torch.Tensor, name: str, where: str, stored: torch.dtype | None = None) -> None:
    """ValueError naming a weight (`where`: its file) that holds NaN or an infinity (as stored, or made by the cast from
    `stored`, e.g. fp32 values past float16's 65504): a model with one computes NaN logits, or
    sends every token to one place, silently. Scales are checked alike (quantization/checkpoint.py).
    An FP8 (e4m3fn) weight is read by its bits: it has NaNs and no infinities."""
    if t.dtype == torch.float8_e4m3fn:
        bad = (t.view(torch.uint8) & 0x7F) == 0x7F
    elif t.is_floating_point():
        bad = ~torch.isfinite(t)
    else:
        return
    count = int(bad.sum())
    if count:
        cast = f" once cast from {stored} to {t.dtype} (past its range)" if stored not in (None, t.dtype) else ""
        raise ValueError(f"{where}: tensor {name!r} holds {count} NaN or infinite value(s){cast}: the model "
                         "would compute NaN or infinite logits")
