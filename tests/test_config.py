"""trtllm.config: defaults, bad values and unknown fields refused, naming the field."""

from __future__ import annotations

import re

import pytest

from trtllm.config import BuildConfig, ConfigError, KvCacheConfig, QuantAlgo, QuantConfig, kv_cache_dtype
from trtllm.runtime.speculative.config import NGramDecodingConfig
from trtllm.sampling_params import SamplingParams


def test_kv_cache_defaults():
    c = KvCacheConfig()
    assert (c.free_gpu_memory_fraction, c.max_tokens, c.enable_block_reuse, c.tokens_per_block,
            c.dtype) == (0.9, None, True, 32, "auto")


def test_build_defaults():
    c = BuildConfig()
    assert (c.max_batch_size, c.max_input_len, c.max_seq_len, c.max_num_tokens,
            c.max_beam_width) == (256, 4096, None, 8192, 1)


def test_quant_defaults():
    c = QuantConfig()
    assert c.quant_algo is None and c.kv_cache_quant_algo is None
    c.check_supported()
    QuantConfig(quant_algo="NO_QUANT").check_supported()


def test_good_values():
    assert KvCacheConfig(free_gpu_memory_fraction=1.0, max_tokens=4096, tokens_per_block=128,
                         enable_block_reuse=False).tokens_per_block == 128
    assert BuildConfig(max_input_len=100, max_seq_len=100, max_num_tokens=1).max_seq_len == 100


@pytest.mark.parametrize("cls, field, value", [
    (KvCacheConfig, "free_gpu_memory_fraction", 0.0),
    (KvCacheConfig, "free_gpu_memory_fraction", 1.5),
    (KvCacheConfig, "free_gpu_memory_fraction", -0.1),
    (KvCacheConfig, "max_tokens", 0),
    (KvCacheConfig, "tokens_per_block", 8),
    (KvCacheConfig, "tokens_per_block", 48),
    (KvCacheConfig, "tokens_per_block", 256),
    (KvCacheConfig, "dtype", "float16"),
    (KvCacheConfig, "enable_block_reuse", "maybe"),
    (BuildConfig, "max_batch_size", 0),
    (BuildConfig, "max_input_len", -1),
    (BuildConfig, "max_seq_len", 0),
    (BuildConfig, "max_num_tokens", 0),
    (BuildConfig, "max_beam_width", 0),
    (QuantConfig, "quant_algo", "FP9"),
    (QuantConfig, "kv_cache_quant_algo", "int3"),
])
def test_bad_value_names_the_field(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


@pytest.mark.parametrize("cls", [KvCacheConfig, BuildConfig, QuantConfig])
def test_unknown_field_refused_by_name(cls):
    with pytest.raises(ConfigError, match="free_gpu_mem_fraction") as e:
        cls(free_gpu_mem_fraction=0.5)
    assert str(e.value) == f"{cls.__name__}.free_gpu_mem_fraction=0.5: unknown option"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_not_finite_is_refused_as_such(value):
    with pytest.raises(ConfigError) as e:
        KvCacheConfig(free_gpu_memory_fraction=value)
    assert str(e.value) == f"KvCacheConfig.free_gpu_memory_fraction={value!r}: must be a finite number"


def test_one_line_per_bad_field_without_pydantic_links():
    with pytest.raises(ConfigError) as e:
        BuildConfig(max_batch_size=-1, max_num_tokens="many")
    lines = str(e.value).splitlines()
    assert lines == ["BuildConfig.max_batch_size=-1: must be greater than 0",
                     "BuildConfig.max_num_tokens='many': must be a valid integer, unable to parse string as an integer"]
    assert [p[0] for p in e.value.problems] == ["max_batch_size", "max_num_tokens"]
    with pytest.raises(ConfigError, match=r"^KvCacheConfig.tokens_per_block=100: ") as e:
        KvCacheConfig().tokens_per_block = 100
    assert "pydantic" not in str(e.value) and "http" not in str(e.value)


def test_a_required_field_left_out_is_named_without_the_other_options():
    from trtllm.runtime.speculative.config import DraftTargetDecodingConfig
    with pytest.raises(ConfigError) as e:
        DraftTargetDecodingConfig(max_draft_len=4)
    assert str(e.value) == "DraftTargetDecodingConfig.speculative_model_dir: required"  # pydantic's input: every option


def test_assignment_is_validated():
    c = KvCacheConfig()
    with pytest.raises(ValueError, match="tokens_per_block"):
        c.tokens_per_block = 100


def test_kv_cache_dtype_from_either_config():
    """KvCacheConfig(dtype=...) or QuantConfig(kv_cache_quant_algo=...) selects a quantized
    cache; both may name one if they agree; a conflict names both fields."""
    for dtype in ("auto", "fp8", "int8"):
        assert kv_cache_dtype(KvCacheConfig(dtype=dtype), None) == dtype
        assert kv_cache_dtype(KvCacheConfig(dtype=dtype), QuantConfig()) == dtype
        assert kv_cache_dtype(KvCacheConfig(dtype=dtype), QuantConfig(kv_cache_quant_algo="NO_QUANT")) == dtype
    for algo, dtype in (("FP8", "fp8"), ("INT8", "int8")):
        QuantConfig(kv_cache_quant_algo=algo).check_supported()
        assert kv_cache_dtype(KvCacheConfig(), QuantConfig(kv_cache_quant_algo=algo)) == dtype
        assert kv_cache_dtype(KvCacheConfig(dtype=dtype), QuantConfig(kv_cache_quant_algo=algo)) == dtype
    with pytest.raises(ConfigError, match=r"KvCacheConfig.dtype='fp8': conflicts with "
                                          r"QuantConfig.kv_cache_quant_algo=INT8"):
        kv_cache_dtype(KvCacheConfig(dtype="fp8"), QuantConfig(kv_cache_quant_algo="INT8"))
    with pytest.raises(ValueError, match="dtype must be one of 'auto', 'fp8', 'int8'"):
        KvCacheConfig(dtype="nvfp4")


def test_max_beam_width_bounds():
    assert BuildConfig(max_beam_width=4).max_beam_width == 4
    with pytest.raises(ValueError, match="max_beam_width=17"):
        BuildConfig(max_beam_width=17)


def test_max_input_len_within_max_seq_len():
    with pytest.raises(ValueError, match=r"max_input_len \(4096\) exceeds max_seq_len \(2048\)"):
        BuildConfig(max_input_len=4096, max_seq_len=2048)
    # left at its default, max_input_len follows a smaller max_seq_len down
    assert BuildConfig(max_seq_len=2048).input_len_for(2048) == 2048
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        BuildConfig(max_input_len=300).input_len_for(256)
    c = BuildConfig(max_input_len=1024)  # max_seq_len None: the model decides
    assert c.max_seq_len_for(2048) == 2048
    assert BuildConfig(max_input_len=10, max_seq_len=20).max_seq_len_for(2048) == 20
    with pytest.raises(ValueError, match="max_seq_len=4096 exceeds the model's max_position_embeddings=2048"):
        BuildConfig(max_seq_len=4096).max_seq_len_for(2048)
    with pytest.raises(ValueError, match=r"names no max_position_embeddings.*BuildConfig\(max_seq_len=\.\.\.\)"):
        BuildConfig().max_seq_len_for(None)
    assert BuildConfig(max_seq_len=100).max_seq_len_for(None) == 100


def test_quant_algo_names_and_strings():
    for name in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A16", "W4A16_AWQ", "NVFP4"):
        assert QuantAlgo(name).value == name
    assert QuantConfig(quant_algo="W4A16_AWQ").quant_algo is QuantAlgo.W4A16_AWQ


@pytest.mark.parametrize("algo", [QuantAlgo.W4A16_AWQ, QuantAlgo.NVFP4, QuantAlgo.INT8])
def test_weight_quantization_not_implemented_is_refused_naming_what_is(algo):
    c = QuantConfig(quant_algo=algo)  # describable (a checkpoint may say so) ...
    with pytest.raises(ValueError, match=f"quant_algo={algo.value}: not implemented; supported: FP8, "
                                         "FP8_PER_CHANNEL_PER_TOKEN, FP8_BLOCK_SCALES"):
        c.check_supported()  # ... but refused when an LLM is built


@pytest.mark.parametrize("algo", ["FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES"])
def test_fp8_weights_are_supported(algo):
    c = QuantConfig(quant_algo=algo)
    c.check_supported()
    assert c.weight_algo is QuantAlgo(algo)
    assert QuantConfig(quant_algo="NO_QUANT").weight_algo is None


@pytest.mark.parametrize("algo", [QuantAlgo.W4A16_AWQ, QuantAlgo.NVFP4, QuantAlgo.FP8_BLOCK_SCALES])
def test_kv_cache_quant_algo_other_than_fp8_int8_is_refused(algo):
    c = QuantConfig(kv_cache_quant_algo=algo)
    with pytest.raises(ValueError, match=f"kv_cache_quant_algo={algo.value}: a KV cache is quantized to FP8 or INT8"):
        c.check_supported()
    with pytest.raises(ValueError, match=f"kv_cache_quant_algo={algo.value}: a KV cache is quantized to FP8 or INT8"):
        kv_cache_dtype(KvCacheConfig(), c)


def test_scheduler_config_policies():
    from trtllm import CapacitySchedulerPolicy, ContextChunkingPolicy, SchedulerConfig
    assert not SchedulerConfig().no_evict  # MAX_UTILIZATION, as vLLM's (TensorRT-LLM defaults to no-evict)
    assert SchedulerConfig(capacity_scheduler_policy=CapacitySchedulerPolicy.GUARANTEED_NO_EVICT).no_evict
    assert SchedulerConfig(capacity_scheduler_policy="GUARANTEED_NO_EVICT",
                           context_chunking_policy=ContextChunkingPolicy.FIRST_COME_FIRST_SERVED).no_evict
    for fields, words in [(dict(capacity_scheduler_policy="STATIC_BATCH"), "STATIC_BATCH"),
                          (dict(context_chunking_policy="EQUAL_PROGRESS"), "EQUAL_PROGRESS"),
                          (dict(dynamic_batch_config={"enable_batch_size_tuning": True}), "dynamic_batch_config"),
                          (dict(capacity_scheduler_policy="FASTEST"), "capacity_scheduler_policy"),
                          (dict(max_utilization=True), "max_utilization")]:
        with pytest.raises(ConfigError, match=words):
            SchedulerConfig(**fields)


@pytest.mark.parametrize("make, rule", [
    (lambda: KvCacheConfig(free_gpu_memory_fraction=True), "free_gpu_memory_fraction=True: must be a number, not a bool"),
    (lambda: BuildConfig(max_batch_size=True), "max_batch_size=True: must be a number, not a bool"),
    (lambda: KvCacheConfig(max_tokens=True), "max_tokens=True: must be a number, not a bool"),
    (lambda: KvCacheConfig(enable_block_reuse="yes"), "enable_block_reuse='yes': must be True or False"),
    (lambda: KvCacheConfig(enable_block_reuse=0), "enable_block_reuse=0: must be True or False"),
    (lambda: NGramDecodingConfig(max_draft_len=True), "max_draft_len=True: must be a number, not a bool"),
    (lambda: NGramDecodingConfig(verify_cuda_graphs=1), "verify_cuda_graphs=1: must be True or False"),
    (lambda: SamplingParams(max_tokens=True), "max_tokens=True: must be a number, not a bool"),
    (lambda: SamplingParams(ignore_eos="false"), "ignore_eos='false': must be True or False"),
])
def test_bool_and_number_are_not_coerced_into_each_other(make, rule):
    # pydantic's lax mode took True as 1 and "false" as False
    with pytest.raises(ConfigError, match=re.escape(rule)):
        make()


def test_optional_bool_and_bool_or_literal_fields_keep_their_other_values():
    assert NGramDecodingConfig(verify_cuda_graphs=None).verify_cuda_graphs is None
    sp = SamplingParams(use_beam_search=True, n=2, best_of=2, early_stopping="never")
    assert sp.early_stopping == "never"
    assert KvCacheConfig(free_gpu_memory_fraction=1).free_gpu_memory_fraction == 1.0
