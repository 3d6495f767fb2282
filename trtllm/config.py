"""User-facing configs, named as in TensorRT-LLM: `KvCacheConfig`, `BuildConfig`, `QuantConfig`.

Validated when made (and on assignment): a bad value raises `ConfigError` (a
`ValueError`) with one line per bad field naming the field, the value and the rule;
unknown fields are refused by name, so a typo or a TensorRT-LLM option we lack never
silently means "default". NaN and infinities are refused as not finite (how: validated_config.py).
`LoraConfig` lives in lora_config.py and is importable from here too.

    KvCacheConfig(free_gpu_memory_fraction=0.9, max_tokens=None, enable_block_reuse=True,
                  tokens_per_block=32, dtype="auto", event_buffer_max_size=0)
    BuildConfig(max_batch_size=256, max_input_len=4096, max_seq_len=None,
                max_num_tokens=8192, max_beam_width=1)
        .max_seq_len_for(max_position_embeddings or None) -> int
    QuantConfig(quant_algo=None, kv_cache_quant_algo=None).check_supported()
    QuantAlgo: TensorRT-LLM's algorithm names (FP8, W4A16_AWQ, NVFP4, ...)
    CudaGraphConfig(batch_sizes=None, max_batch_size=0, enable_padding=True, max_prefill_tokens=2048)
    SchedulerConfig(capacity_scheduler_policy=MAX_UTILIZATION | GUARANTEED_NO_EVICT)
    kv_cache_dtype(kv_cache_config, quant_config) -> "auto" | "fp8" | "int8"
"""

from __future__ import annotations

from enum import Enum

from pydantic import Field, field_validator, model_validator

from trtllm.lora_config import LoraConfig  # noqa: F401 (its public home was here)
from trtllm.validated_config import ConfigError, ValidatedConfig

# KvCacheConfig.dtype's values, as TensorRT-LLM spells them (kv_cache_dtype: how they meet
# QuantConfig.kv_cache_quant_algo)
KV_CACHE_DTYPES = ("auto", "fp8", "int8")


class KvCacheConfig(ValidatedConfig):
    """How much memory the paged KV cache takes, and how it is laid out and shared."""

    free_gpu_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0,
        description="fraction of the GPU memory free after loading the model given to the cache")
    max_tokens: int | None = Field(
        None, gt=0, description="cache capacity in tokens at most (None: by memory fraction only)")
    enable_block_reuse: bool = Field(True, description="share cached prompt prefixes between requests")
    tokens_per_block: int = Field(32, description="tokens per cache page: 16, 32, 64 or 128")
    dtype: str = Field("auto", description='"auto": the model\'s activation dtype (or the quantized cache '
                                           'QuantConfig.kv_cache_quant_algo names); "fp8" (e4m3) or "int8": '
                                           'a quantized cache, twice the tokens in the same memory as 16-bit')
    event_buffer_max_size: int = Field(0, ge=0, description="KV-cache events (blocks stored and removed) kept for "
                                       "LLM.get_kv_cache_events(); 0: none recorded (runtime/kv_cache_events.py)")

    @model_validator(mode="after")
    def _events_need_reuse(self):
        if self.event_buffer_max_size and not self.enable_block_reuse:
            raise ValueError("event_buffer_max_size > 0 needs enable_block_reuse=True: the events are the "
                             "prefix cache's (blocks stored for reuse, and removed)")
        return self

    @field_validator("tokens_per_block")
    @classmethod
    def _tokens_per_block(cls, v):
        # Powers of two keep the kernels' page indexing to shifts and masks; the range
        # is what the paged attention kernel is tuned for.
        if v not in (16, 32, 64, 128):
            raise ValueError(f"tokens_per_block must be a power of 2 from 16 to 128, got {v}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in KV_CACHE_DTYPES:
            raise ValueError(f'dtype must be one of {", ".join(map(repr, KV_CACHE_DTYPES))} ("auto": the '
                             f"model's dtype), got {v!r}")
        return v


class BuildConfig(ValidatedConfig):
    """Static limits the engine is sized for: batch, sequence lengths, tokens per step."""

    max_batch_size: int = Field(256, gt=0, description="sequences in one step at most")
    max_input_len: int = Field(4096, gt=0, description="prompt tokens at most")
    max_seq_len: int | None = Field(
        None, gt=0, description="prompt + generated tokens at most (None: the model's "
                                "max_position_embeddings)")
    max_num_tokens: int = Field(8192, ge=1, description="tokens in one step at most (all sequences)")
    max_beam_width: int = Field(1, gt=0, le=16, description="beams a beam search request may use at most "
                                                             "(SamplingParams beam_width / best_of)")

    @model_validator(mode="after")
    def _lengths(self):
        # only a max_input_len the user set can contradict max_seq_len; the default
        # just follows it down (LLM clamps it with input_len_for)
        if "max_input_len" in self.model_fields_set and self.max_seq_len is not None \
                and self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len ({self.max_input_len}) exceeds max_seq_len "
                             f"({self.max_seq_len})")
        return self

    def with_limits(self, **limits) -> BuildConfig:
        """This config with TensorRT-LLM 1.x's top-level `LLM(max_batch_size=..., max_num_tokens=...,
        max_seq_len=..., max_input_len=..., max_beam_width=...)` (None: not given) set in it;
        ValueError where one contradicts a value this config sets itself."""
        given = {k: v for k, v in limits.items() if v is not None}
        clash = [f"{k}={v} and build_config.{k}={getattr(self, k)}" for k, v in given.items()
                 if k in self.model_fields_set and getattr(self, k) != v]
        if clash:
            raise ValueError(f"two values for one limit: {'; '.join(clash)}; give it once")
        return self if not given else BuildConfig(**{**self.model_dump(exclude_unset=True), **given})

    def input_len_for(self, max_seq_len: int) -> int:
        """max_input_len, lowered to max_seq_len when it was left at its default."""
        if "max_input_len" in self.model_fields_set:
            if self.max_input_len > max_seq_len:
                raise ValueError(f"max_input_len ({self.max_input_len}) exceeds max_seq_len ({max_seq_len})")
            return self.max_input_len
        return min(self.max_input_len, max_seq_len)

    def max_seq_len_for(self, max_position_embeddings: int | None) -> int:
        """max_seq_len, or the model's max_position_embeddings where it is None. A model
        that names no length needs max_seq_len; a max_seq_len past the model's length is
        refused: positions it was never trained on give garbage, not an error."""
        if max_position_embeddings is None:
            if self.max_seq_len is None:
                raise ValueError("the model names no max_position_embeddings (no config.max_position_embeddings): "
                                 "set BuildConfig(max_seq_len=...) to the longest sequence it handles")
            return self.max_seq_len
        if self.max_seq_len is None:
            return max_position_embeddings
        if self.max_seq_len > max_position_embeddings:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} exceeds the model's max_position_embeddings="
                f"{max_position_embeddings}: its output past that position is not trustworthy. For a model "
                "whose rope scaling supports more, raise max_position_embeddings in its config.json "
                "(or model.config) to the scaled length")
        return self.max_seq_len


class CudaGraphConfig(ValidatedConfig):
    """Which steps replay CUDA graphs (runtime/cuda_graphs.py), as TensorRT-LLM's `cuda_graph_config`,
    plus `max_prefill_tokens` (ours): steps of several tokens a sequence (prefill, chunked prefill,
    decode + prefill) up to that many tokens replay graphs captured for token buckets, which
    take a 128-token prefill of an 8B model from ~24 ms of host launches to one replay.
    `LLM(enable_cuda_graph=False)` turns every graph off."""

    batch_sizes: list[int] | None = Field(
        None, description="decode batch sizes to capture (default: 1, 2, 4, ... up to max_batch_size)")
    max_batch_size: int = Field(0, ge=0, description="the largest decode batch captured when batch_sizes is "
                                                     "None (0: BuildConfig.max_batch_size)")
    enable_padding: bool = Field(True, description="a decode step pads to the next captured batch size; False: "
                                                   "only steps of exactly a captured size replay (TensorRT-LLM's "
                                                   "default is False; trtllm pads by default)")
    max_prefill_tokens: int = Field(2048, ge=0, description="steps of more than one token a sequence with at most "
                                                            "this many tokens replay prefill graphs (0: none)")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(b <= 0 for b in v)):
            raise ValueError("must be a non-empty list of positive batch sizes")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        # TensorRT-LLM's rule: with batch_sizes, max_batch_size is their maximum (or left 0)
        if self.batch_sizes is not None and self.max_batch_size not in (0, max(self.batch_sizes)):
            raise ValueError(f"max_batch_size={self.max_batch_size} contradicts batch_sizes={self.batch_sizes} "
                             f"(their largest is {max(self.batch_sizes)})")
        return self


class CapacitySchedulerPolicy(str, Enum):
    """How admission weighs the KV pool (TensorRT-LLM's names; values are the names)."""

    MAX_UTILIZATION = "MAX_UTILIZATION"  # admit what fits now; preempt (recompute) when the pool runs out
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"  # admit only what can run to its max_tokens: never preempt
    STATIC_BATCH = "STATIC_BATCH"  # refused: in-flight batching only


class ContextChunkingPolicy(str, Enum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"  # refused: chunks go to the oldest prompt first


class SchedulerConfig(ValidatedConfig):
    """TensorRT-LLM's `scheduler_config` (runtime/scheduler.py). trtllm's default policy is
    MAX_UTILIZATION, as vLLM's scheduler: a request is admitted when its prompt fits, and when
    decoding runs out of blocks the newest request is preempted and later recomputed.
    GUARANTEED_NO_EVICT (TensorRT-LLM's default) admits a request only when the pool can hold it
    and every running request through their max_tokens: no preemption, fewer requests at once."""

    capacity_scheduler_policy: CapacitySchedulerPolicy = Field(
        CapacitySchedulerPolicy.MAX_UTILIZATION, description="MAX_UTILIZATION or GUARANTEED_NO_EVICT")
    context_chunking_policy: ContextChunkingPolicy | None = Field(
        None, description="FIRST_COME_FIRST_SERVED (None: the same)")
    dynamic_batch_config: dict | None = Field(None, description="refused (batch sizes are not tuned at runtime)")

    @model_validator(mode="after")
    def _supported(self):
        if self.capacity_scheduler_policy is CapacitySchedulerPolicy.STATIC_BATCH:
            raise ValueError("capacity_scheduler_policy STATIC_BATCH is not supported: requests join and leave the "
                             "batch every step (in-flight batching); use MAX_UTILIZATION or GUARANTEED_NO_EVICT")
        if self.context_chunking_policy is ContextChunkingPolicy.EQUAL_PROGRESS:
            raise ValueError("context_chunking_policy EQUAL_PROGRESS is not supported: prompt chunks go to the "
                             "oldest prompt first (FIRST_COME_FIRST_SERVED)")
        if self.dynamic_batch_config is not None:
            raise ValueError("dynamic_batch_config is not supported: BuildConfig's max_batch_size and "
                             "max_num_tokens bound every step")
        return self

    @property
    def no_evict(self) -> bool:
        return self.capacity_scheduler_policy is CapacitySchedulerPolicy.GUARANTEED_NO_EVICT


class QuantAlgo(str, Enum):
    """TensorRT-LLM's quantization algorithm names (values are the names)."""

    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    INT8 = "INT8"
    NVFP4 = "NVFP4"
    W4A8_NVFP4_FP8 = "W4A8_NVFP4_FP8"
    W4A16_MXFP4 = "W4A16_MXFP4"
    MIXED_PRECISION = "MIXED_PRECISION"
    NO_QUANT = "NO_QUANT"


# the weight algorithms implemented (online at load time, or read from an FP8 checkpoint)
FP8_WEIGHT_ALGOS = (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, QuantAlgo.FP8_BLOCK_SCALES)


class QuantConfig(ValidatedConfig):
    """Which quantization the weights (quant_algo) and the KV cache (kv_cache_quant_algo) use.

    Any algorithm may be described (a checkpoint's quantization config is read into
    one); `check_supported`, called when an LLM is built, refuses those not implemented.
    """

    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None

    def check_supported(self) -> None:
        """Raise ValueError naming the field if it asks for quantization not implemented:
        quant_algo may be one of FP8_WEIGHT_ALGOS (FP8 linears, docs/quantization.md), the
        KV cache FP8 or INT8."""
        if self.quant_algo not in (None, QuantAlgo.NO_QUANT, *FP8_WEIGHT_ALGOS):
            raise ValueError(f"quant_algo={self.quant_algo.value}: not implemented; supported: "
                             f"{', '.join(a.value for a in FP8_WEIGHT_ALGOS)}")
        if self.kv_cache_quant_algo not in (None, QuantAlgo.NO_QUANT, *_KV_CACHE_ALGOS.values()):
            raise ValueError(f"kv_cache_quant_algo={self.kv_cache_quant_algo.value}: a KV cache is quantized "
                             "to FP8 or INT8 (or not: None / NO_QUANT)")

    @property
    def weight_algo(self) -> QuantAlgo | None:
        """The weights' algorithm to apply at load time, None for none."""
        return None if self.quant_algo in (None, QuantAlgo.NO_QUANT) else self.quant_algo


_KV_CACHE_ALGOS = {"fp8": QuantAlgo.FP8, "int8": QuantAlgo.INT8}


def kv_cache_dtype(kv_cache_config: KvCacheConfig, quant_config: QuantConfig | None) -> str:
    """The KV cache's format, "auto" (the model's dtype), "fp8" or "int8", from both places
    that may name it: KvCacheConfig.dtype and QuantConfig.kv_cache_quant_algo (e.g. read
    from a checkpoint). Either alone selects it; if both name a quantization they must agree."""
    dtype = kv_cache_config.dtype
    algo = quant_config.kv_cache_quant_algo if quant_config is not None else None
    if algo in (None, QuantAlgo.NO_QUANT):
        return dtype
    by_algo = next((name for name, a in _KV_CACHE_ALGOS.items() if a is algo), None)
    if by_algo is None:
        raise ValueError(f"QuantConfig.kv_cache_quant_algo={algo.value}: a KV cache is quantized to FP8 or INT8")
    if dtype not in ("auto", by_algo):
        raise ConfigError("KvCacheConfig", [("dtype", dtype, f"conflicts with QuantConfig.kv_cache_quant_algo="
                                                             f"{algo.value}; set one, or the same in both")])
    return by_algo
