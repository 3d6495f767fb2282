"""Pre-quantized FP8 MoE checkpoints into our model files (Qwen3-MoE here): the per-expert FP8
tensors stack into the 3-D expert parameters as stored, each expert's scales alike, and the
blocks run as `fused_moe_fp8`. Per channel and in 128x128 blocks the checkpoint's experts are what
QuantConfig's online FP8 makes of the bf16 checkpoint, so the engines give the same tokens; a
per-tensor expert scale stacks as its rows' repeated scale (each expert's dequantized weights are
the checkpoint's); what the fused MoE cannot run is refused by name."""
import json

import pytest
import torch

from tests.models.checkpoints import write_checkpoint
from tests.quantization.fp8_checkpoints import write_fp8_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams
from trtllm.config import QuantAlgo, QuantConfig
from trtllm.models.loader import load_model
from trtllm.quantization import fp8_linears_of

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 3], list(range(60, 81))]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # whole engines on the ops' references


def source(tmp_path, **overrides):
    path = write_checkpoint("qwen3_moe", tmp_path / "bf16", vocab_size=512, **overrides)
    make_tokenizer(path)
    return path


def tokens(path, **kwargs):
    with LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512),
             build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=64), **kwargs) as llm:
        out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
        graph = {n.target for g in llm.compiled.graphs for n in g.graph.nodes}
        assert torch.ops.trtllm.fused_moe_fp8.default in graph
        return out


@pytest.mark.parametrize("layout,granularity,algo,width", [
    ("compressed_tensors", "channel", QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, 32),
    ("hf_fp8", "block", QuantAlgo.FP8_BLOCK_SCALES, 128),  # Qwen3-30B-A3B-FP8's layout; I a multiple of 128
])
def test_fp8_experts_of_a_checkpoint_give_online_fp8s_tokens(tmp_path, layout, granularity, algo, width):
    src = source(tmp_path, moe_intermediate_size=width)
    write_fp8_checkpoint(src, tmp_path / "fp8", layout, granularity, static=False)
    assert tokens(tmp_path / "fp8") == tokens(src, quant_config=QuantConfig(quant_algo=algo))


def test_per_tensor_expert_scales_stack_as_repeated_rows(tmp_path):
    src = source(tmp_path)
    written = write_fp8_checkpoint(src, tmp_path / "tensor", "hf_fp8", "tensor", static=False)
    fp8 = fp8_linears_of(load_model(tmp_path / "tensor", dtype=torch.float32, device="cpu"))
    experts = fp8.experts["model.layers.1.mlp.experts"]
    w13, w2 = experts.dequantized()
    for e in range(4):
        prefix = f"model.layers.1.mlp.experts.{e}"
        gate, up, down = (written[f"{prefix}.{p}"].dequantized() for p in ("gate_proj", "up_proj", "down_proj"))
        assert torch.equal(w13[e], torch.cat([gate, up])) and torch.equal(w2[e], down)
    assert experts.w13_scale.shape == (4, 64, 1)  # per-tensor: each projection's scale over its 32 rows
    assert tokens(tmp_path / "tensor")  # and it runs


def test_what_the_fused_moe_cannot_run_is_refused_by_name(tmp_path):
    src = source(tmp_path)
    write_fp8_checkpoint(src, tmp_path / "static", "compressed_tensors", "channel", static=True)
    with pytest.raises(ValueError, match="FP8 experts with static input scales .* are not supported"):
        load_model(tmp_path / "static", dtype=torch.float32, device="cpu")
    write_fp8_checkpoint(src, tmp_path / "blocks", "hf_fp8", "block", static=False)  # I = 32
    with pytest.raises(ValueError, match="experts.0.gate_proj: 128x128 block scales of an expert projection of 32"):
        load_model(tmp_path / "blocks", dtype=torch.float32, device="cpu")
    config = json.loads((tmp_path / "blocks" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
