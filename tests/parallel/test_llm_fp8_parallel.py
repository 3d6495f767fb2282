"""FP8 under tensor and pipeline parallelism (CPU, gloo): QuantConfig's online FP8 weights and an
FP8 KV cache give one rank's FP8 greedy tokens (fp32 activations, the ops' references, as
tests/quantization/test_fp8_linears.py). A rank's FP8 slice is exactly one rank's quantization of
the whole weight, sliced (quantization/fp8_slices.py); a row-parallel linear's activations
quantize with the whole row's amax (all-reduced). What stays unsupported is refused by name."""
from __future__ import annotations

import pytest
import torch

from tests.models.checkpoints import write_checkpoint
from tests.parallel.test_llm_tensor_parallel import checkpoint, greedy
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM
from trtllm.config import BuildConfig, KvCacheConfig, QuantAlgo, QuantConfig
from trtllm.kernels.fp8_gemm import SCALE_BLOCK
from trtllm.quantization import quantize_weight
from trtllm.quantization.fp8_slices import activation_group, fp8_slice, narrow_fp8

pytestmark = pytest.mark.usefixtures("reference_ops")

ALGOS = [QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, QuantAlgo.FP8_BLOCK_SCALES]


def small_llm(path, *, algo: QuantAlgo | None = None, kv_dtype: str = "auto", **kwargs) -> LLM:
    # 8 tokens a step below a prompt's 14: chunked prefill; 4 blocks of 16 tokens: preemption
    return LLM(str(path), dtype="float32", device="cpu", quant_config=QuantConfig(quant_algo=algo),
               kv_cache_config=KvCacheConfig(dtype=kv_dtype, tokens_per_block=16, max_tokens=64),
               build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=32), **kwargs)


# -- a rank's slice: one rank's quantization, sliced ---------------------------------------
def reads(w: torch.Tensor, dim: int, start: int, length: int):
    """(read_part, read_whole, what was read)."""
    read = []

    def part():
        read.append("part")
        return w.narrow(dim, start, length).clone()

    def whole():
        read.append("whole")
        return w.clone()
    return part, whole, read


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dim,start,length", [(0, 0, 256), (0, 256, 128), (1, 0, 128), (1, 256, 64),
                                              (0, 16, 32), (1, 130, 60)])
def test_a_ranks_slice_is_one_ranks_quantization_sliced(algo, dim, start, length):
    w = torch.randn(384, 320) * torch.logspace(-2, 1, 384)[:, None]  # rows of very different size
    part, whole, read = reads(w, dim, start, length)
    got = fp8_slice(algo, tuple(w.shape), dim, start, length, part, whole)
    want = narrow_fp8(quantize_weight(w, algo), dim, start, length)
    assert torch.equal(got.weight.float(), want.weight.float())
    assert torch.equal(got.weight_scale, want.weight_scale) and got.granularity == want.granularity
    torch.testing.assert_close(got.dequantized(), quantize_weight(w, algo).dequantized().narrow(dim, start, length))
    # the slice alone when its scales cover only it: per-channel rows, blocks that start on one
    exact = (algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN and dim == 0) or \
        (algo == QuantAlgo.FP8_BLOCK_SCALES and start % SCALE_BLOCK == 0)
    assert read == (["part"] if exact else ["whole"])


def test_a_slice_that_splits_a_scale_block_is_refused_naming_the_numbers():
    w = torch.randn(384, 320)
    part, whole, _ = reads(w, 0, 192, 192)
    with pytest.raises(ValueError, match=r"q_proj.weight: this rank's rows \[192, 384\) of 384 start inside a "
                                         r"128x128 scale block and cross into the next"):
        fp8_slice(QuantAlgo.FP8_BLOCK_SCALES, (384, 320), 0, 192, 192, part, whole, "q_proj.weight")
    assert activation_group(QuantAlgo.FP8, 4096, 2048, 2048, "g") == "g"  # per token: the whole row's amax
    assert activation_group(QuantAlgo.FP8_BLOCK_SCALES, 4096, 2048, 2048, "g") is None  # groups are one rank's
    assert activation_group(QuantAlgo.FP8_BLOCK_SCALES, 64, 32, 32, "g") == "g"  # one group a row
    with pytest.raises(ValueError, match=r"o_proj: this rank's input features \[96, 192\) of 384 split the 1x128"):
        activation_group(QuantAlgo.FP8_BLOCK_SCALES, 384, 96, 96, "g", "o_proj")


# -- engines ------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", [QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN,
                                  pytest.param(QuantAlgo.FP8, marks=pytest.mark.slow),
                                  pytest.param(QuantAlgo.FP8_BLOCK_SCALES, marks=pytest.mark.slow)])
def test_two_tensor_parallel_ranks_give_one_ranks_fp8_tokens(tmp_path, algo):
    path = checkpoint("llama31", tmp_path)
    with small_llm(path, algo=algo) as llm:
        expected = greedy(llm)
        assert len(llm.compiled.quantization.linears) == 14
    with small_llm(path, algo=algo, tensor_parallel_size=2) as llm:
        assert greedy(llm) == expected
        assert llm.engine_stats().num_preemptions > 0
        fp8_linears = llm.compiled.quantization.linears  # rank 0's slices, made by the pass
        assert len(fp8_linears) == 14
        q = fp8_linears["model.layers.0.mlp.down_proj"]
        assert tuple(q.weight.shape) == (64, 64) and q.activation_group is not None  # [H, I/2], row-parallel
        assert tuple(fp8_linears["model.layers.0.self_attn.q_proj"].weight.shape) == (32, 64)


def test_two_pipeline_stages_give_one_ranks_fp8_tokens_with_an_fp8_kv_cache(tmp_path):
    path = checkpoint("llama31", tmp_path)
    options = dict(algo=QuantAlgo.FP8, kv_dtype="fp8")
    with pytest.warns(UserWarning, match="FP8 KV cache without k/v scales"):
        llm = small_llm(path, **options)
    with llm:
        expected = greedy(llm)
    with pytest.warns(UserWarning, match="FP8 KV cache without k/v scales"):
        llm = small_llm(path, pipeline_parallel_size=2, **options)
    with llm:
        assert greedy(llm) == expected
        assert llm.engine.runner.cache.k.dtype == torch.float8_e4m3fn
        assert llm.engine_stats().num_preemptions > 0
        assert set(llm.compiled.quantization.linears) == {f"model.layers.0.{m}" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")}  # stage 0: its layer, quantized whole as it loaded


@pytest.mark.slow
def test_two_by_two_ranks_give_one_ranks_fp8_tokens_with_an_fp8_kv_cache(tmp_path):
    path = write_checkpoint("qwen3", tmp_path / "qwen3", vocab_size=512, num_hidden_layers=4)
    make_tokenizer(path)
    options = dict(algo=QuantAlgo.FP8_BLOCK_SCALES, kv_dtype="fp8")
    with pytest.warns(UserWarning, match="FP8 KV cache"):
        llm = small_llm(path, **options)
    with llm:
        expected = greedy(llm)
    with pytest.warns(UserWarning, match="FP8 KV cache"):
        llm = small_llm(path, tensor_parallel_size=2, pipeline_parallel_size=2, **options)
    with llm:
        assert greedy(llm) == expected


def test_kv_cache_scales_per_kv_head_split_with_the_ranks(tmp_path):
    # an INT8 KV cache with per-KV-head scales (calibrated on one rank): at TP=2 each rank takes its
    # KV head's, at PP=2 each stage its layers'; both give one rank's tokens with those scales
    from trtllm.runtime.kv_cache_quant import calibrate_kv_scales
    path = checkpoint("llama31", tmp_path)
    with small_llm(path) as llm:
        t = calibrate_kv_scales(llm.compiled, [list(range(5, 40)), [7, 8, 9] * 6], "int8", per_head=True)
    assert t.shape[2] == 2 and not torch.equal(t[:, :, 0], t[:, :, 1])  # two KV heads, scales of their own
    scales = [(layer[0], layer[1]) for layer in t]
    with small_llm(path, kv_dtype="int8", kv_cache_scales=scales) as llm:
        expected = greedy(llm)
    for sizes in (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)):
        with small_llm(path, kv_dtype="int8", kv_cache_scales=scales, **sizes) as llm:
            assert greedy(llm) == expected, sizes


@pytest.mark.parametrize("sizes", [dict(tensor_parallel_size=2, moe_expert_parallel_size=2),
                                   pytest.param(dict(pipeline_parallel_size=2), marks=pytest.mark.slow)])
def test_fp8_experts_under_expert_and_pipeline_parallelism_give_one_ranks_tokens(tmp_path, sizes):
    # a rank's experts quantized as one rank quantizes each whole expert (rank_fp8_experts); a stage's
    # as it loads them; attention slices as for a dense model
    path = checkpoint("qwen3_moe", tmp_path)
    with small_llm(path, algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN) as llm:
        expected = greedy(llm)
    with small_llm(path, algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, **sizes) as llm:
        assert greedy(llm) == expected
        targets = {n.target for g in llm.compiled.graphs for n in g.graph.nodes}
        assert torch.ops.trtllm.fused_moe.default not in targets
        if "pipeline_parallel_size" not in sizes:  # (stage 0 holds layer 0, a dense one)
            assert torch.ops.trtllm.fused_moe_fp8.default in targets


@pytest.mark.slow
def test_fp8_block_experts_split_by_features_on_block_boundaries(tmp_path):
    # TP inside the experts (moe_tp = 2) with 128x128 blocks: 256 intermediate features, 128 a rank
    path = write_checkpoint("qwen3_moe", tmp_path / "wide", vocab_size=512, moe_intermediate_size=256)
    make_tokenizer(path)
    with small_llm(path, algo=QuantAlgo.FP8_BLOCK_SCALES) as llm:
        expected = greedy(llm)
    with small_llm(path, algo=QuantAlgo.FP8_BLOCK_SCALES, tensor_parallel_size=2) as llm:
        assert greedy(llm) == expected


@pytest.mark.parametrize("sizes", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_an_int8_kv_cache_calibrated_across_the_ranks_gives_one_ranks_tokens(tmp_path, sizes):
    # no scales given: each rank's caches report their layers' and heads' amax over the built-in text,
    # rank 0 makes the whole model's per-tensor scales and hands them back (parallel/kv_calibration.py)
    path = checkpoint("llama31", tmp_path)
    with small_llm(path, kv_dtype="int8") as llm:
        expected, one = greedy(llm), llm.engine.runner.cache.scales.clone()
    with small_llm(path, kv_dtype="int8", **sizes) as llm:
        assert greedy(llm) == expected
        mine = llm.engine.runner.cache.scales  # rank 0's: its layers' and KV heads'
        if "pipeline_parallel_size" in sizes:
            torch.testing.assert_close(mine, one[:1])
        else:
            torch.testing.assert_close(mine, one[:, :, :1])


@pytest.mark.parametrize("family,kwargs,why", [
    ("llama31", dict(pipeline_parallel_size=2, kv_cache_scales=[(1.0, 1.0)] * 2),
     "kv_cache_scales given for an unquantized KV cache"),
    ("llama31", dict(tensor_parallel_size=2, kv_dtype="int8", kv_cache_scales=[(1.0, 1.0)] * 3),
     r"3 \(k_scale, v_scale\) pairs for 2 layers"),
    ("qwen3_moe", dict(tensor_parallel_size=2, algo=QuantAlgo.FP8),
     r"FP8 experts \(FP8\) split by their intermediate features \(moe_tensor_parallel_size=2\) would quantize the "
     "intermediate activations per rank: use moe_expert_parallel_size=2"),
])
def test_what_stays_unsupported_is_refused_by_name_before_any_process_starts(tmp_path, family, kwargs, why):
    with pytest.raises(ValueError, match=why):
        small_llm(checkpoint(family, tmp_path), **kwargs)
