"""passes/split_pipeline_stage.py in one process: each stage of a model compiled with its
`PipelineStage`, the first's hidden states fed to the next through `stage_input`, gives the
whole model's logits (fp32); each stage's KV cache holds only its layers; a stage that would
read a weight it did not load is refused."""
from __future__ import annotations

import pytest
import torch

import trtllm
from tests.models.checkpoints import random_batch, write_checkpoint
from trtllm.contract import CompileError
from trtllm.models.loader import load_model
from trtllm.parallel.pipeline_parallel import PipelineStage, stage_input


def _stages(path, bounds, leave_unloaded=None):
    compiled = []
    for i, (first, end) in enumerate(bounds):
        model = load_model(path, dtype=torch.float32, device="cpu", leave_unloaded=leave_unloaded)
        stage = PipelineStage(i, len(bounds), first, end, model.config.hidden_size, torch.float32)
        compiled.append(trtllm.compile(model, pipeline=stage))
    return compiled


def _run(stages, ids, positions):
    hidden = None
    for stage in stages:
        if hidden is None:
            hidden = stage(ids, positions)
        else:
            with stage_input(hidden):
                hidden = stage(ids, positions)
    return hidden


@pytest.mark.parametrize("family,bounds", [
    ("llama31", [(0, 1), (1, 3), (3, 4)]),   # three stages
    pytest.param("qwen2", [(0, 3), (3, 4)], marks=pytest.mark.slow),   # tied: the last stage's head is the embedding
    pytest.param("gemma2", [(0, 1), (1, 4)], marks=pytest.mark.slow),  # alternating windows: each stage's own
])
def test_stages_in_turn_give_the_whole_models_logits(tmp_path, family, bounds):
    path = write_checkpoint(family, tmp_path / family, num_hidden_layers=4)
    ids, positions = random_batch(batch=2, seq_len=7), torch.arange(7).expand(2, 7)
    whole = trtllm.compile(load_model(path, dtype=torch.float32, device="cpu"))
    stages = _stages(path, bounds)
    torch.testing.assert_close(_run(stages, ids, positions), whole(ids, positions), rtol=1e-5, atol=1e-5)
    for stage, (first, end) in zip(stages, bounds):
        assert stage.attention.num_layers == end - first
        assert stage.attention.windows == whole.attention.windows[first:end]
        assert stage.matches["split_pipeline_stage"] == 1
    assert _run(stages[:1], ids, positions).shape == (2, 7, 64)  # a first stage's output: hidden states


def test_a_stage_that_reads_a_weight_it_did_not_load_is_refused(tmp_path):
    from trtllm.parallel.pipeline_parallel import layer_of
    path = write_checkpoint("llama31", tmp_path / "llama31", num_hidden_layers=4)
    # stage 0 of 2 but layer 1's weights left unloaded, as if they were stage 1's
    (stage,) = _stages(path, [(0, 2)], leave_unloaded=lambda name: layer_of(name) == 1)
    stage = trtllm.compile(stage.module, pipeline=PipelineStage(0, 2, 0, 2, 64, torch.float32))
    with pytest.raises(CompileError, match="loaded only pipeline stage 0's weights"):
        stage(random_batch(batch=1, seq_len=3), torch.arange(3)[None])
