"""A quantized KV cache through the LLM API (runtime/kv_cache_quant.py): selected by
KvCacheConfig(dtype=...) or QuantConfig(kv_cache_quant_algo=...); its scales from
kv_cache_scales (a checkpoint's), 1.0 with a warning (FP8), or calibration at build
(INT8); half the bytes a token. The ops' references run here (tests/runtime/conftest.py);
the kernels are held to them in tests/kernels/test_paged_attention_kv_quant.py and
tests/test_demo_model.py."""
import warnings

import pytest
import torch

from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, ConfigError, KvCacheConfig, QuantAlgo, QuantConfig
from trtllm.models.loader import load_model
from trtllm.runtime.kv_budget import blocks_in, bytes_per_block
from trtllm.runtime.kv_cache_quant import CALIBRATION_TEXTS, calibrate_kv_scales, kv_cache_quant
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 2], list(range(60, 81)), [9]]
NEW = 10
LAYERS, KV_HEADS = 2, 2  # tests/models/checkpoints.py's llama31


@pytest.fixture(scope="module")
def checkpoint(checkpoint):
    make_tokenizer(checkpoint)
    return checkpoint


def small_llm(path, kv=None, **options):
    build = options.pop("build", {})
    return LLM(str(path), dtype="float32", kv_cache_config=kv or KvCacheConfig(tokens_per_block=16, max_tokens=4096),
               build_config=BuildConfig(**{"max_batch_size": 8, "max_num_tokens": 64, "max_seq_len": 64, **build}),
               **options)


def greedy(llm, prompts=PROMPTS):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def fp8(**kw):
    return KvCacheConfig(dtype="fp8", tokens_per_block=16, max_tokens=4096, **kw)


def test_fp8_cache_warns_without_scales_and_generates(checkpoint):
    with pytest.warns(UserWarning, match="FP8 KV cache without k/v scales .* every scale is 1.0"):
        llm = small_llm(checkpoint, fp8())
    with llm:
        cache, kv = llm.engine.runner.cache, llm.engine.runner.kv_quant
        assert cache.k.dtype == cache.v.dtype == torch.float8_e4m3fn
        assert kv.source == "default 1.0" and torch.equal(cache.scales, torch.ones(LAYERS, 2, KV_HEADS))
        out = greedy(llm)
        assert [len(t) for t in out] == [NEW] * len(PROMPTS)
        assert cache.k.float().abs().sum() > 0 and cache.v.float().abs().sum() > 0  # written
        # the same text whether a prompt is prefilled at once, in chunks, or partly from the
        # prefix cache: new tokens attend to their keys as the cache stores them
        assert greedy(llm) == out and llm.block_manager.prefix_hit_rate > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with small_llm(checkpoint, fp8(enable_block_reuse=False), build={"max_batch_size": 2,
                                                                         "max_num_tokens": 4}) as llm:
            assert greedy(llm) == out


def test_int8_by_quant_config_is_calibrated_at_build(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no 1.0 warning
        llm = small_llm(checkpoint, quant_config=QuantConfig(kv_cache_quant_algo=QuantAlgo.INT8),
                        build={"max_seq_len": 256, "max_num_tokens": 512})
    with llm:
        cache, kv = llm.engine.runner.cache, llm.engine.runner.kv_quant
        assert cache.k.dtype == torch.int8 and kv.source == "calibration"
        assert cache.scales.shape == (LAYERS, 2, KV_HEADS) and (cache.scales > 0).all()
        assert torch.equal(cache.scales, cache.scales[:, :, :1].expand_as(cache.scales))  # per tensor
        assert [len(t) for t in greedy(llm)] == [NEW] * len(PROMPTS)
        # the scales are the amax of what the model writes over the calibration text / 127
        prompts = [llm.tokenizer.encode(t) for t in CALIBRATION_TEXTS]
        assert torch.equal(calibrate_kv_scales(llm.compiled, prompts, "int8"), kv.scales)
        # served, the calibration text reaches +-127 in every layer's K and V: the range is used to its end
        llm.generate(list(CALIBRATION_TEXTS), SamplingParams(max_tokens=1), use_tqdm=False)
        for c in (cache.k, cache.v):
            assert c.flatten(1).abs().amax(dim=1).tolist() == [127] * LAYERS


def test_calibration_is_the_amax_of_the_written_cache(checkpoint):
    """calibrate_kv_scales against the keys and values an unquantized engine's prefill
    wrote to its own cache, per layer and kv head."""
    prompt = list(range(3, 40))
    with small_llm(checkpoint) as llm:
        llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
        cache, bm = llm.engine.runner.cache, llm.block_manager
        blocks = [b for b in range(bm.num_blocks) if bm._hash[b] is not None]  # the prompt's full blocks
        assert len(blocks) == len(prompt) // 16
        per_head = calibrate_kv_scales(llm.compiled, [prompt[:len(blocks) * 16]], "fp8", per_head=True)
        for i, c in enumerate((cache.k, cache.v)):
            amax = c[:, blocks].abs().amax(dim=(1, 2, 4))  # [L, Hkv]
            torch.testing.assert_close(per_head[:, i] * 448.0, amax, rtol=1e-5, atol=0)
        per_tensor = calibrate_kv_scales(llm.compiled, [prompt[:len(blocks) * 16]], "int8")
        torch.testing.assert_close(per_tensor * 127.0, (per_head * 448.0).amax(dim=2, keepdim=True).expand_as(
            per_head), rtol=1e-5, atol=0)


def test_checkpoint_scales_are_used(checkpoint):
    scales = [(0.05, torch.tensor(0.04)), (torch.tensor([0.03, 0.06]), [0.02, 0.01])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = small_llm(checkpoint, fp8(), kv_cache_scales=scales)
    with llm:
        kv = llm.engine.runner.kv_quant
        assert kv.source == "checkpoint"
        torch.testing.assert_close(llm.engine.runner.cache.scales, torch.tensor(
            [[[0.05, 0.05], [0.04, 0.04]], [[0.03, 0.06], [0.02, 0.01]]]))
        assert [len(t) for t in greedy(llm)] == [NEW] * len(PROMPTS)


def test_bad_choices_are_refused_by_name(checkpoint):
    with pytest.raises(ConfigError, match="KvCacheConfig.dtype='fp8': conflicts with QuantConfig.kv_cache_quant_algo=INT8"):
        small_llm(checkpoint, fp8(), quant_config=QuantConfig(kv_cache_quant_algo="INT8"))
    with pytest.raises(ValueError, match="kv_cache_quant_algo=NVFP4: a KV cache is quantized to FP8 or INT8"):
        small_llm(checkpoint, quant_config=QuantConfig(kv_cache_quant_algo="NVFP4"))
    with pytest.raises(ValueError, match="3 \\(k_scale, v_scale\\) pairs for 2 layers"):
        small_llm(checkpoint, fp8(), kv_cache_scales=[(1.0, 1.0)] * 3)
    with pytest.raises(ValueError, match="layer 1 k_scale = \\[-1.0\\] must be finite and > 0"):
        small_llm(checkpoint, fp8(), kv_cache_scales=[(1.0, 1.0), (-1.0, 1.0)])
    with pytest.raises(ValueError, match="kv_cache_scales given for an unquantized KV cache"):
        small_llm(checkpoint, kv_cache_scales=[(1.0, 1.0)] * 2)
    module = load_model(checkpoint, dtype=torch.float32, device="cpu")  # a module: no tokenizer
    with pytest.raises(ValueError, match="INT8 KV cache needs k/v scales: .* no tokenizer to calibrate"):
        LLM(module, kv_cache_config=KvCacheConfig(dtype="int8", max_tokens=1024),
            build_config=BuildConfig(max_batch_size=2, max_num_tokens=64, max_seq_len=64))


def test_pool_holds_twice_the_tokens_in_the_same_memory(checkpoint):
    with small_llm(checkpoint) as plain, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = plain.compiled
        bf16_block = bytes_per_block(compiled, 16, torch.bfloat16)
        for dtype in (torch.float8_e4m3fn, torch.int8):
            assert 2 * bytes_per_block(compiled, 16, dtype) == bf16_block
            assert blocks_in(1000 * bf16_block, compiled, 16, dtype) == 2 * blocks_in(1000 * bf16_block, compiled, 16,
                                                                                    torch.bfloat16) == 2000
        with small_llm(checkpoint, fp8()) as quantized:
            # max_tokens fixes the tokens here (no GPU memory to size by): the same tokens, a
            # quarter of the fp32 model's bytes
            assert quantized.block_manager.num_blocks == plain.block_manager.num_blocks
            assert 4 * quantized.engine.runner.cache.nbytes == plain.engine.runner.cache.nbytes
            assert quantized.engine_stats().blocks_total == plain.engine_stats().blocks_total


def test_fp8_cache_on_a_gpu_without_fp8_is_refused_when_built(monkeypatch):
    """Before sm_89 (an A100 here, faked) an FP8 cache is refused by name when the engine is
    built; INT8 needs no FP8."""
    from types import SimpleNamespace

    from trtllm.contract import AttentionSpec

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    compiled = SimpleNamespace(device=torch.device("cuda", 0),
                               attention=AttentionSpec(2, 2, 16, torch.bfloat16, (0, 0), (0.0, 0.0)))
    with pytest.raises(RuntimeError, match=r"an FP8 KV cache \(KvCacheConfig\(dtype='fp8'\)\): .*sm_89.*A100.*sm_80"):
        kv_cache_quant("fp8", compiled, [(1.0, 1.0)] * 2)
    assert kv_cache_quant("int8", compiled, [(1.0, 1.0)] * 2).dtype == torch.int8
