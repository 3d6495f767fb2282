"""`build_engine`: a model (a checkpoint path or a module) to a running `Engine`: load or take
it, quantize, compile, size the KV pool, capture the CUDA graphs. `LLM` (runtime/llm.py) drives
the engine on a thread, `EngineCoreClient` (runtime/engine_client.py) in a process of its own.

With `tensor_parallel_size > 1` or `pipeline_parallel_size > 1` rank 0's engine is built here and
the workers (trtllm/parallel) run until `shutdown_workers(engine)`; under torchrun, a rank other
than 0 serves rank 0's steps here instead and then exits (docs/parallel.md). With a `LoraConfig`, the compiled model gets LoRA slots
(trtllm/lora_slots.py, passes/apply_lora.py) and the engine an adapter cache (runtime/adapters.py).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from trtllm.compile import compile as trtllm_compile
from trtllm.config import (
    BuildConfig,
    CudaGraphConfig,
    KvCacheConfig,
    QuantConfig,
    SchedulerConfig,
    kv_cache_dtype,
)
from trtllm.contract import adapter_module_path
from trtllm.lora_config import LoraConfig
from trtllm.lora_request import LoRARequest
from trtllm.lora_slots import DEFAULT_TARGET_MODULES, LoraSlots
from trtllm.models.loader import load_model
from trtllm.parallel.expert_parallel import resolve_moe_sizes
from trtllm.parallel.rank_model import RankLora
from trtllm.quantization.checkpoint import checkpoint_kv_cache_scales, kv_cache_scales_by_layer
from trtllm.quantization.fp8_linears import fp8_linears_of, quantize_model
from trtllm.runtime.adapters import Adapters, read_peft_adapter, read_target_modules
from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.build_defaults import read_build_defaults
from trtllm.runtime.engine import Engine
from trtllm.runtime.engine_limits import EngineLimits, check_stream_interval
from trtllm.runtime.engine_stats import StartupTimes
from trtllm.runtime.kv_budget import num_kv_blocks
from trtllm.runtime.kv_cache_events import KvCacheEvents
from trtllm.runtime.kv_cache_quant import kv_cache_quant
from trtllm.runtime.model_probe import eos_token_ids_of, vocab_size_of
from trtllm.runtime.model_runner import ModelRunner
from trtllm.runtime.mrope_positions import mrope_stager
from trtllm.runtime.multimodal_stager import multimodal_stager
from trtllm.runtime.parallel_start import calibrate_parallel, start_parallel_engine
from trtllm.runtime.scheduler import Scheduler
from trtllm.runtime.speculative.build import build_speculative, check_speculative_config
from trtllm.runtime.speculative.config import EagleDecodingConfig, MTPDecodingConfig
from trtllm.runtime.tokenizer import load_tokenizer
from trtllm.validated_config import as_config

log = logging.getLogger("trtllm")

_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_engine(model: str | Path | nn.Module | None = None, tokenizer=None, dtype: str = "auto",
                 kv_cache_config: KvCacheConfig | None = None, build_config: BuildConfig | None = None,
                 quant_config: QuantConfig | None = None, enable_cuda_graph: bool = True,
                 device: str | torch.device | None = None, compile_options: dict | None = None,
                 stream_interval: int = 1, disable_overlap_scheduler: bool = False,
                 kv_cache_scales=None, tensor_parallel_size: int = 1, speculative_config=None,
                 lora_config: LoraConfig | None = None, moe_expert_parallel_size: int | None = None,
                 moe_tensor_parallel_size: int | None = None, pipeline_parallel_size: int = 1,
                 pp_partition: list[int] | None = None, cuda_graph_config: CudaGraphConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None, limits: dict | None = None,
                 skip_tokenizer_init: bool = False, enable_chunked_prefill: bool = True) -> Engine:
    """Load (a path) or take (a module) the model, compile it, size the KV pool, capture
    the CUDA graphs: the `Engine` that `LLM` drives on a thread and `EngineCoreClient`
    in a process of its own. Arguments as `LLM`'s; `limits`: its top-level max_batch_size ...
    (TensorRT-LLM 1.x's), set in the build config; skip_tokenizer_init: no tokenizer (token ids
    only). `engine.startup` says where the time went.
    A checkpoint written by trtllm-build brings its defaults (runtime/build_defaults.py): its
    BuildConfig when none is given, its KV cache format when none is named.
    kv_cache_scales: a quantized KV cache's (k_scale, v_scale) per layer (runtime/kv_cache_quant.py).
    With tensor_parallel_size or pipeline_parallel_size > 1 the workers run until
    `shutdown_workers(engine)`; pp_partition: layers per pipeline stage (default: balanced by
    parameter count, trtllm/parallel/pipeline_parallel.py).
    speculative_config: NGramDecodingConfig, DraftTargetDecodingConfig, SpeculativeDecodingConfig,
    EagleDecodingConfig or MTPDecodingConfig (runtime/speculative; the draft model is built before
    the target's KV pool is sized; MTP reads its layer from `model`'s directory).
    moe_expert_parallel_size / moe_tensor_parallel_size: how the MoE layers split the
    tensor_parallel_size ranks, as TensorRT-LLM's (parallel/expert_parallel.py).
    cuda_graph_config: which steps replay CUDA graphs (None: CudaGraphConfig's defaults;
    enable_cuda_graph=False: none). scheduler_config: the admission policy (SchedulerConfig;
    None: MAX_UTILIZATION)."""
    started = time.perf_counter()
    if model is not None and not isinstance(model, (str, os.PathLike, nn.Module)):
        raise TypeError(f"model must be a checkpoint directory (str or Path), an nn.Module or None (the demo "
                        f"model), got {type(model).__name__}")
    if cuda_graph_config is not None and not isinstance(cuda_graph_config, CudaGraphConfig):
        raise TypeError(f"cuda_graph_config must be a CudaGraphConfig, got {type(cuda_graph_config).__name__}")
    if scheduler_config is not None and not isinstance(scheduler_config, SchedulerConfig):
        raise TypeError(f"scheduler_config must be a SchedulerConfig, got {type(scheduler_config).__name__}")
    # TensorRT-LLM 1.x's configs are pydantic models that take a dict for each: so do these
    build_config, kv_cache_config, quant_config = (as_config(name, value, cls) for name, value, cls in (
        ("build_config", build_config, BuildConfig), ("kv_cache_config", kv_cache_config, KvCacheConfig),
        ("quant_config", quant_config, QuantConfig)))
    if not isinstance(enable_chunked_prefill, bool):
        raise TypeError(f"enable_chunked_prefill must be True or False, got {enable_chunked_prefill!r}")
    scheduling = dict(no_evict=scheduler_config is not None and scheduler_config.no_evict,
                      enable_chunked_prefill=enable_chunked_prefill)
    moe = resolve_moe_sizes(tensor_parallel_size, moe_expert_parallel_size, moe_tensor_parallel_size)
    check_stream_interval(stream_interval)  # before minutes of loading and compiling
    check_speculative_config(speculative_config)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    quant_config = quant_config or QuantConfig()
    kv_cache_config = kv_cache_config or KvCacheConfig()
    defaults = read_build_defaults(model) if isinstance(model, (str, Path)) else None  # trtllm-build's
    if defaults is not None:
        build_config = build_config or defaults.build_config
        if kv_cache_config.dtype == "auto" and quant_config.kv_cache_quant_algo is None:
            quant_config = quant_config.model_copy(update={"kv_cache_quant_algo": defaults.kv_cache_quant_algo})
    quant_config.check_supported()
    kv_format = kv_cache_dtype(kv_cache_config, quant_config)  # a conflict refused before loading
    build_config = (build_config or BuildConfig()).with_limits(**(limits or {}))
    if model is None:
        from trtllm.demo import demo_model_path
        model = demo_model_path()
    if skip_tokenizer_init and tokenizer is not None:
        raise ValueError("skip_tokenizer_init=True with a tokenizer: give one or the other")
    # where the tokenizer loads from: the one given, else the checkpoint's (none: token ids in and out)
    tokenizer = None if skip_tokenizer_init else tokenizer if tokenizer is not None else \
        model if isinstance(model, (str, os.PathLike)) else None
    if lora_config is not None:
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"lora_config must be a LoraConfig, got {type(lora_config).__name__}")
        for directory in lora_config.lora_dir:  # a missing one named before minutes of loading
            read_target_modules(directory)
    if pp_partition is not None and pipeline_parallel_size == 1:
        raise ValueError(f"pp_partition={pp_partition} given without pipeline_parallel_size > 1")
    if tensor_parallel_size != 1 or pipeline_parallel_size != 1:
        what = (f"tensor_parallel_size={tensor_parallel_size}" if pipeline_parallel_size == 1
                else f"pipeline_parallel_size={pipeline_parallel_size}")
        if isinstance(speculative_config, MTPDecodingConfig) or (
                pipeline_parallel_size != 1 and isinstance(speculative_config, EagleDecodingConfig)):
            raise ValueError(f"{what} with {type(speculative_config).__name__} is not supported yet (n-gram and "
                             "draft-model speculation are, and EAGLE-3 under tensor parallelism alone)")
        if kv_cache_scales is None and isinstance(model, (str, Path)) and (Path(model) / "config.json").is_file():
            # an FP8 checkpoint's k_scale / v_scale (if it has them), read here for every rank
            kv_cache_scales = checkpoint_kv_cache_scales(model, kv_format)
        calibrate = kv_format == "int8" and kv_cache_scales is None  # across the ranks, once they run
        if kv_format == "auto" and kv_cache_scales is not None:
            kv_cache_quant("auto", None, kv_cache_scales)  # refused naming the missing cache format
        lora = None if lora_config is None else RankLora(lora_config, _lora_targets(lora_config),
                                                         max(build_config.max_num_tokens, build_config.max_batch_size))
        compiled, kv_cache_scales = start_parallel_engine(model, _DTYPES[dtype], device, compile_options, kv_cache_config,
                                                    tensor_parallel_size, pipeline_parallel_size, pp_partition,
                                                    moe.moe_ep, quant_config.weight_algo, kv_format, kv_cache_scales,
                                                    lora, max(build_config.max_num_tokens, build_config.max_batch_size))
        try:
            if calibrate:
                kv_cache_scales = calibrate_parallel(compiled, tokenizer, kv_format)
            # a decode graph would replay on rank 0 alone (issue 22: left), under either parallelism
            enable_cuda_graph = False
            # n-gram, a draft model or an EAGLE-3 head: the draft runs on rank 0 alone, whole; the ranks verify
            return _build_engine(compiled.module, compiled, started, tokenizer,
                                 kv_cache_config, build_config, enable_cuda_graph, stream_interval,
                                 disable_overlap_scheduler, kv_format, kv_cache_scales,
                                 _speculative(speculative_config, dtype, compile_options, model), lora_config,
                                 scheduling=scheduling)
        except BaseException:
            compiled.tensor_parallel.workers.shutdown()
            raise
    if isinstance(model, nn.Module):
        module = model
        if quant_config.weight_algo is not None:  # in place, one linear at a time
            quantize_model(module, quant_config.weight_algo)
    else:  # an FP8 checkpoint's layout is read from the directory; weight_algo quantizes as it loads
        module = load_model(model, dtype=_DTYPES[dtype], device=device, quant_algo=quant_config.weight_algo)
    lora = _lora_slots(lora_config, module, build_config) if lora_config is not None else None
    compiled = trtllm_compile(module, **(compile_options or {}), block_size=kv_cache_config.tokens_per_block,
                              **({"lora": lora} if lora is not None else {}))
    return _build_engine(module, compiled, started, tokenizer, kv_cache_config, build_config, enable_cuda_graph,
                         stream_interval, disable_overlap_scheduler, kv_format, kv_cache_scales,
                         _speculative(speculative_config, dtype, compile_options, model), lora_config, cuda_graph_config,
                         scheduling)


def _speculative(config, dtype: str, compile_options: dict | None, model) -> dict | None:
    """What _build_engine needs to build the speculative decoder (None: no speculation)."""
    return None if config is None else dict(config=config, dtype=_DTYPES[dtype], compile_options=compile_options,
                                            target_dir=model if isinstance(model, (str, Path)) else None)


def _lora_slots(config: LoraConfig, module: nn.Module, build_config: BuildConfig) -> LoraSlots:
    """The LoRA slots the compiled model reads: the target modules named, else those of the
    adapters in lora_dir, else every attention and MLP linear."""
    device = next(module.parameters()).device
    max_num_tokens = max(build_config.max_num_tokens, build_config.max_batch_size)
    return LoraSlots(config.max_loras, config.max_lora_rank, _lora_targets(config), max_num_tokens, device,
                     adapter_module_path(module))


def _lora_targets(config: LoraConfig) -> tuple[str, ...]:
    targets = list(config.lora_target_modules)
    if not targets:
        for directory in config.lora_dir:
            targets += read_target_modules(directory)
    return tuple(targets or DEFAULT_TARGET_MODULES)


def shutdown_workers(engine: Engine) -> None:
    """End a tensor-parallel engine's worker processes (none: nothing to do)."""
    tp = engine.runner.compiled.tensor_parallel
    if tp is not None and tp.workers is not None:
        tp.workers.shutdown()


def _build_engine(module: nn.Module, compiled, started: float, tokenizer, kv_cache_config: KvCacheConfig,
                  build_config: BuildConfig, enable_cuda_graph: bool, stream_interval: int,
                  disable_overlap_scheduler: bool, kv_format: str, kv_cache_scales,
                  speculative: dict | None = None, lora_config: LoraConfig | None = None,
                  cuda_graph_config: CudaGraphConfig | None = None, scheduling: dict | None = None) -> Engine:
    load_s = time.perf_counter() - started  # the load (compilation itself is lazy: compiled.compile_s)
    tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
    config = getattr(module, "config", None)
    max_seq_len = build_config.max_seq_len_for(getattr(config, "max_position_embeddings", None))
    max_input_len = build_config.input_len_for(max_seq_len)
    max_num_seqs = build_config.max_batch_size
    max_num_tokens = max(build_config.max_num_tokens, max_num_seqs)
    fp8 = fp8_linears_of(module)
    if kv_cache_scales is None and fp8 is not None:  # an FP8 checkpoint's k_scale / v_scale, if it has them
        kv_cache_scales = kv_cache_scales_by_layer(fp8, kv_format, compiled.attention.num_layers,
                                                   fp8.source or "the checkpoint")
    kv_quant = kv_cache_quant(kv_format, compiled, kv_cache_scales, tokenizer)
    multimodal = multimodal_stager(module, compiled, max_num_tokens,  # None: text only
                                   speculative["config"] if speculative is not None else None, enable_cuda_graph)
    vocab_size, eos_token_ids = vocab_size_of(module, compiled), eos_token_ids_of(module, tokenizer)
    if speculative is not None:  # the draft's weights and pool first: the target's pool takes what is left
        speculative = build_speculative(
            speculative["config"], vocab_size=vocab_size, eos_token_ids=eos_token_ids, max_num_seqs=max_num_seqs,
            max_num_tokens=max_num_tokens, max_seq_len=max_seq_len, block_size=kv_cache_config.tokens_per_block,
            kv_max_tokens=kv_cache_config.max_tokens, device=compiled.device, dtype=speculative["dtype"],
            enable_cuda_graph=enable_cuda_graph, compile_options=speculative["compile_options"], target=compiled,
            target_dir=speculative["target_dir"], tokenizer=tokenizer)
    blocks = num_kv_blocks(compiled, kv_cache_config, max_num_tokens, max_num_seqs, max_seq_len,
                           kv_quant.dtype if kv_quant else None)
    # an EAGLE-3 head's stores and its own runner, now that the target's pool is sized
    hidden_states = speculative.attach_target(blocks * kv_cache_config.tokens_per_block) if speculative is not None else None
    block_manager = BlockManager(blocks, kv_cache_config.tokens_per_block, kv_cache_config.enable_block_reuse)
    if kv_cache_config.event_buffer_max_size:  # LLM.get_kv_cache_events()
        block_manager.events = KvCacheEvents(kv_cache_config.event_buffer_max_size, max_seq_len, blocks)
    adapters = _adapters(lora_config, compiled, module) if lora_config is not None else None
    compile_before_capture = compiled.compile_s
    runner = ModelRunner(compiled, num_blocks=blocks, block_size=kv_cache_config.tokens_per_block,
                         max_num_tokens=max_num_tokens, max_num_seqs=max_num_seqs,
                         max_model_len=max_seq_len, enable_cuda_graph=enable_cuda_graph, kv_quant=kv_quant,
                         adapters=adapters, multimodal=multimodal,
                         mrope=mrope_stager(module, max_num_tokens, compiled.device), cuda_graph_config=cuda_graph_config,
                         hidden_states=hidden_states)
    scheduler = Scheduler(block_manager, max_num_seqs, max_num_tokens, max_seq_len, adapters=adapters,
                          **(scheduling or {}))
    engine = Engine(runner, block_manager, scheduler, tokenizer,
                    EngineLimits(max_num_seqs, max_num_tokens, max_input_len, max_seq_len,
                                 build_config.max_beam_width, scheduler.enable_chunked_prefill),
                    vocab_size, eos_token_ids, stream_interval, disable_overlap_scheduler, adapters)
    if compiled.pipeline is not None:  # one micro-batch a stage in flight (docs/parallel.md says why)
        engine.set_pipeline_depth(compiled.pipeline.num_stages)
    if speculative is not None:
        engine.set_speculative(speculative)
        # None ("wherever the engine can"): on a GPU with CUDA graphs
        if speculative.verify_cuda_graphs is not False and enable_cuda_graph and runner.device.type == "cuda":
            runner.cuda_graphs.capture_verify(speculative.max_draft_len + 1, sorted(runner.cuda_graphs.decode))
            speculative.uniform_verify = True
    capture_s = runner.cuda_graphs.capture_s - (compiled.compile_s - compile_before_capture)
    engine.startup = StartupTimes(load_s, compiled.compile_s, capture_s, time.perf_counter() - started,
                                  compiled.captures, len(compiled.graphs))
    log.info(engine.startup.line())
    return engine


def _adapters(config: LoraConfig, compiled, module: nn.Module) -> Adapters:
    """The engine's adapter cache, once the model is compiled (the pass makes the slots: the
    KV profiling call compiles on a GPU, one short call here elsewhere); lora_dir's adapters
    checked against it."""
    slots = compiled.lora
    if not slots.groups:
        zeros = torch.zeros((1, 2), dtype=torch.long, device=compiled.device)
        compiled(zeros, torch.arange(2, device=compiled.device)[None])
    workers = compiled.tensor_parallel.workers if compiled.tensor_parallel is not None else None
    if workers is not None:  # every rank's linears: an adapter is checked against the whole model
        workers.share_lora_modules(slots)
    if not slots.groups and not slots.elsewhere:
        raise ValueError(f"LoRA: the model has no linear named in target modules {sorted(slots.target_modules)}")
    for directory in config.lora_dir:
        read_peft_adapter(LoRARequest(Path(directory).name or str(directory), 1, str(directory)), slots)
    return Adapters(config, slots, next(module.parameters()).dtype,
                    workers.load_adapter if workers is not None else None)
