"""parallel/checkpoint_slices.py: a tensor-parallel rank's slices, read as the loader reads whole
tensors (a NaN or an infinity, or integers for a float weight, refused naming the tensor)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.checkpoints import write_checkpoint
from trtllm.parallel.checkpoint_slices import CheckpointSlices


def test_a_slice_holding_nan_is_refused_by_name(tmp_path):
    """The rank's slices skip the loader's own check (leave_unloaded): they loaded it silently."""
    path = write_checkpoint("llama2", tmp_path)
    weights = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name][40, 3] = float("nan")  # in rows 32..63: the second of two ranks' slices
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    slices, stand_in = CheckpointSlices(path), torch.empty(64, 64)
    assert torch.isfinite(slices(name, stand_in, dim=0, start=0, length=32)).all()
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' holds 1 NaN"):
        slices(name, stand_in, dim=0, start=32, length=32)


def test_an_integer_slice_for_a_float_weight_is_refused_by_name(tmp_path):
    """Cast to the stand-in's dtype, int8 values passed as weights, silently."""
    path = write_checkpoint("llama2", tmp_path)
    weights = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = (weights[name] * 100).to(torch.int8)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{name}' is torch\.int8, but it is a weight"):
        CheckpointSlices(path)(name, torch.empty(64, 128), dim=1, start=0, length=64)
