"""Pre-quantized FP8 checkpoints under tensor and pipeline parallelism (CPU, gloo): a rank reads
its slice of every FP8 linear as stored, with the scales covering it (quantization/fp8_slices.py
`checkpoint_fp8_slice`), and its stage's layers whole; the checkpoint's KV-cache scales reach
every rank. Greedy tokens equal one rank's on the same checkpoint (fp32 activations, the ops'
references). What stays unsupported is refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.parallel.test_llm_fp8_parallel import small_llm
from tests.parallel.test_llm_tensor_parallel import checkpoint, greedy
from tests.quantization.fp8_checkpoints import write_fp8_checkpoint
from trtllm.config import QuantAlgo
from trtllm.kernels.fp8_gemm import FP8_DTYPE
from trtllm.parallel.tensor_parallel import unloaded
from trtllm.quantization import Fp8Linear, quantize_weight
from trtllm.quantization.fp8_slices import checkpoint_fp8_slice, narrow_fp8

pytestmark = pytest.mark.usefixtures("reference_ops")

LAYER_LINEAR_ELEMENTS = 2 * (64 * 64 + 64 * 32 * 2 + 64 * 64 + 3 * 64 * 128)  # llama31's 2 layers, FP8: a byte each
VOCAB_BYTES = 2 * 4 * 512 * 64  # embedding and head, fp32


def fp8_checkpoint(tmp_path, layout: str, granularity: str, static: bool, family: str = "llama31"):
    return write_fp8_checkpoint(checkpoint(family, tmp_path), tmp_path / f"{family}_{layout}", layout, granularity,
                                static), tmp_path / f"{family}_{layout}"


def with_kv_scales(path, fmt: str, scales: list[tuple[float, float]]) -> None:
    """Give the compressed-tensors checkpoint at `path` KV-cache scales of format `fmt`, a
    (k, v) pair a layer (not powers of two: a scale of 1.0 in their place changes the tokens)."""
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "int" if fmt == "int8" else "float",
                                                        "strategy": "tensor", "dynamic": False, "symmetric": True}
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(path / "model.safetensors"))
    for i, (k, v) in enumerate(scales):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# -- a rank's slice of a stored FP8 weight ---------------------------------------------------
@pytest.mark.parametrize("algo", [QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, QuantAlgo.FP8_BLOCK_SCALES])
@pytest.mark.parametrize("dim,start,length", [(0, 0, 256), (0, 256, 128), (1, 128, 192), (0, 16, 32), (1, 130, 60)])
def test_a_ranks_slice_of_a_stored_weight_is_its_values_and_the_scales_covering_them(algo, dim, start, length):
    w = torch.randn(384, 320) * torch.logspace(-2, 1, 384)[:, None]
    q = quantize_weight(w, algo)  # as a checkpoint stores it
    q.input_scale = torch.tensor([0.37])
    stored = Fp8Linear(unloaded(w.shape, FP8_DTYPE, "cpu"), q.weight_scale, q.input_scale)  # what the rank keeps
    got = checkpoint_fp8_slice(stored, dim, start, length, lambda: q.weight.narrow(dim, start, length).contiguous())
    want = narrow_fp8(q, dim, start, length)
    assert torch.equal(got.weight.float(), want.weight.float()) and torch.equal(got.weight_scale, want.weight_scale)
    assert torch.equal(got.input_scale, q.input_scale)  # a static input scale: every rank's
    torch.testing.assert_close(got.dequantized(), q.dequantized().narrow(dim, start, length))
    with pytest.raises(ValueError, match="not the checkpoint's FP8 slice"):  # read as the model's dtype
        checkpoint_fp8_slice(stored, dim, start, length, lambda: w.narrow(dim, start, length))
    if algo == QuantAlgo.FP8_BLOCK_SCALES:
        with pytest.raises(ValueError, match=r"rows \[192, 384\) of 384 start inside a 128x128 scale block"):
            checkpoint_fp8_slice(stored, 0, 192, 192, lambda: q.weight[192:])


# -- engines ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,granularity,static", [
    ("hf_fp8", "block", False),
    pytest.param("compressed_tensors", "channel", True, marks=pytest.mark.slow),
    pytest.param("modelopt", "tensor", True, marks=pytest.mark.slow),  # ModelOpt FP8: static
])
def test_two_tensor_parallel_ranks_give_one_ranks_tokens_each_reading_its_fp8_slices(tmp_path, layout, granularity,
                                                                                       static):
    written, path = fp8_checkpoint(tmp_path, layout, granularity, static)
    with small_llm(path) as llm:
        expected = greedy(llm)
        assert set(llm.compiled.quantization.linears) == set(written)
        norms = sum(p.numel() * p.element_size() for n, p in llm.compiled.module.named_parameters() if "norm" in n)
    with small_llm(path, tensor_parallel_size=2) as llm:
        assert greedy(llm) == expected
        assert llm.engine_stats().num_preemptions > 0
        slices = llm.compiled.quantization.linears  # rank 0's, read as stored by the pass
        assert set(slices) == set(written)
        q, whole = slices["model.layers.1.mlp.down_proj"], written["model.layers.1.mlp.down_proj"]
        assert torch.equal(q.weight.float(), whole.weight[:, :64].float())  # rank 0's columns of [H, I]
        assert (q.activation_group is None) == static  # dynamic activations: the row's amax all-reduced
        # each rank reads half of every FP8 linear (a byte an element) and of the vocabulary, the norms whole
        assert llm.compiled.tensor_parallel.workers.loaded_bytes() == \
            [norms + (LAYER_LINEAR_ELEMENTS + VOCAB_BYTES) // 2] * 2


@pytest.mark.slow
def test_phi3_fused_fp8_projections_split_into_their_parts(tmp_path):
    # qkv_proj and gate_up_proj stored FP8 per channel: each part reads its rows of the fused weight
    written, path = fp8_checkpoint(tmp_path, "hf_fp8", "channel", False, family="phi3")
    with small_llm(path) as llm:
        expected = greedy(llm)
    with small_llm(path, tensor_parallel_size=2) as llm:
        assert greedy(llm) == expected
        parts = [k for k in llm.compiled.quantization.linears if k.startswith("model.layers.0.self_attn.qkv_proj")]
        assert len(parts) == 3  # q, k and v: one entry a part, by its rows


@pytest.mark.parametrize("sizes", [dict(tensor_parallel_size=2),
                                   pytest.param(dict(pipeline_parallel_size=2), marks=pytest.mark.slow)])
def test_the_checkpoints_int8_kv_scales_reach_every_rank(tmp_path, sizes):
    # an INT8 KV cache is refused under parallelism without scales; the checkpoint's are read for every rank
    _, path = fp8_checkpoint(tmp_path, "compressed_tensors", "channel", False)
    with_kv_scales(path, "int8", [(0.037, 0.023), (0.029, 0.041)])
    with small_llm(path, kv_dtype="int8") as llm:
        expected = greedy(llm)
    with small_llm(path, kv_dtype="int8", **sizes) as llm:
        assert greedy(llm) == expected
        assert llm.engine.runner.cache.k.dtype == torch.int8
    # a checkpoint with scales of another format: not used (a warning); the ranks calibrate their own
    with_kv_scales(path, "fp8", [(0.037, 0.023), (0.029, 0.041)])
    with pytest.warns(UserWarning, match="KV-cache scales are for a fp8 cache, not the int8 cache"):
        llm = small_llm(path, kv_dtype="int8", **sizes)
    with llm:
        assert all(len(tokens) == 8 for tokens in greedy(llm))


@pytest.mark.slow
def test_two_by_two_ranks_give_one_ranks_tokens_with_the_checkpoints_fp8_kv_scales(tmp_path):
    _, path = fp8_checkpoint(tmp_path, "compressed_tensors", "block", False)
    with_kv_scales(path, "fp8", [(0.0037, 0.0023), (0.0029, 0.0041)])
    with small_llm(path, kv_dtype="fp8") as llm:
        expected = greedy(llm)
    with small_llm(path, kv_dtype="fp8", tensor_parallel_size=2, pipeline_parallel_size=2) as llm:
        assert greedy(llm) == expected


def test_what_stays_unsupported_is_refused_by_name(tmp_path):
    _, path = fp8_checkpoint(tmp_path, "hf_fp8", "channel", False)
    with pytest.raises(ValueError, match=r"pre-quantized HF fp8 checkpoint .* would quantize it again"):
        small_llm(path, algo=QuantAlgo.FP8, tensor_parallel_size=2)
    # an FP8 LM head (checkpoints keep it in bf16): split by vocabulary, it is refused
    tensors = load_file(str(path / "model.safetensors"))
    head = quantize_weight(tensors["lm_head.weight"], QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
    tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"] = head.weight, head.weight_scale
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="an FP8 LM head split by vocabulary under tensor parallelism is not supported"):
        small_llm(path, tensor_parallel_size=2)
    moe = checkpoint("qwen3_moe", tmp_path)
    config = json.loads((moe / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (moe / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="a pre-quantized Qwen3MoeForCausalLM checkpoint: its FP8 experts load into our model file on one rank"):
        small_llm(moe, tensor_parallel_size=2)
