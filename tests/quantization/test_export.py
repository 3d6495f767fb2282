"""quantization/export.py: an FP8 model written as a checkpoint and read back by the loader
(sharded, tied head written once); a model with no FP8 linears is refused."""
import json

import pytest
import torch

import trtllm
from tests.models.checkpoints import write_checkpoint
from trtllm.config import QuantAlgo
from trtllm.quantization import fp8_linears_of
from trtllm.quantization.export import export_fp8_checkpoint


@pytest.mark.parametrize("algo", [QuantAlgo.FP8, QuantAlgo.FP8_BLOCK_SCALES])
def test_sharded_export_reads_back_the_same_fp8_linears(tmp_path, algo):
    src = write_checkpoint("qwen2", tmp_path / "src")  # tied head, q/k/v biases
    model = trtllm.load_model(src, dtype=torch.float32, device="cpu", quant_algo=algo)
    kv = torch.rand(2, 2, 2) + 0.1  # [L, 2, Hkv]
    files = export_fp8_checkpoint(model, src, tmp_path / "out", algo, kv, "fp8", max_shard_bytes=20_000)
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map  # tied: the embedding only
    back = trtllm.load_model(tmp_path / "out", dtype=torch.float32, device="cpu")
    a, b = fp8_linears_of(model), fp8_linears_of(back)
    assert sorted(a.linears) == sorted(b.linears) and len(a.linears) == 14
    for path, q in a.linears.items():
        assert torch.equal(q.weight.view(torch.uint8), b.linears[path].weight.view(torch.uint8)), path
        assert torch.equal(q.weight_scale, b.linears[path].weight_scale), path
    for name, p in model.state_dict().items():
        if not any(name == f"{path}.weight" for path in a.linears):
            assert torch.equal(p, back.state_dict()[name]), name
    assert torch.equal(b.kv_scales["model.layers.1.self_attn.v_scale"], kv[1, 1].amax().reshape(1))


def test_a_model_without_fp8_linears_is_refused(tmp_path):
    src = write_checkpoint("llama2", tmp_path / "src")
    model = trtllm.load_model(src, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="carries no FP8 linears"):
        export_fp8_checkpoint(model, src, tmp_path / "out", QuantAlgo.FP8)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("algo,width", [(QuantAlgo.FP8, 32), (QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, 32),
                                        (QuantAlgo.FP8_BLOCK_SCALES, 128)])
def test_fp8_moe_experts_are_written_per_expert_and_read_back(tmp_path, algo, width):
    """QuantConfig FP8 quantizes an MoE model's experts too; they are written as the checkpoint's
    per-expert tensors with their scales and stack back into the same FP8 experts."""
    src = write_checkpoint("qwen3_moe", tmp_path / "src", moe_intermediate_size=width)
    model = trtllm.load_model(src, dtype=torch.float32, device="cpu", quant_algo=algo)
    export_fp8_checkpoint(model, src, tmp_path / "out", algo)
    back = trtllm.load_model(tmp_path / "out", dtype=torch.float32, device="cpu")
    a, b = fp8_linears_of(model).experts, fp8_linears_of(back).experts
    assert sorted(a) == sorted(b) == ["model.layers.1.mlp.experts"]
    for path, q in a.items():
        for mine, theirs in ((q.w13, b[path].w13), (q.w2, b[path].w2)):
            assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)), path
        for mine, theirs in zip(q.dequantized(), b[path].dequantized()):
            assert torch.equal(mine, theirs), path
    if algo == QuantAlgo.FP8_BLOCK_SCALES:  # experts too narrow to write their gate and up blocks apart
        narrow = write_checkpoint("qwen3_moe", tmp_path / "narrow")
        model = trtllm.load_model(narrow, dtype=torch.float32, device="cpu", quant_algo=algo)
        with pytest.raises(ValueError, match="block scales of expert projections of 32 rows"):
            export_fp8_checkpoint(model, narrow, tmp_path / "narrow_out", algo)
        assert not (tmp_path / "narrow_out").exists()
