"""`LLM`: the user API, as TensorRT-LLM's LLM API spells it.

    with LLM(model="path/to/hf_checkpoint") as llm:
        for out in llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=32)):
            print(out.outputs[0].text)
        for partial in llm.generate("Once", SamplingParams(), streaming=True): ...
        out = await llm.generate_async("Hi", SamplingParams(), streaming=False).aresult()

`tensor_parallel_size=N` (TensorRT-LLM's name) runs the model on N ranks of this node (N-1
worker processes, trtllm/parallel): each loads only its slices of the checkpoint, rank 0
schedules and samples; `shutdown()` ends the workers. A rank that dies fails the requests in
flight with an error naming it. `pipeline_parallel_size=P` splits the layers into P stages (one
rank each, or tensor_parallel_size each), balanced by parameter count or as `pp_partition`
(layers per stage) says; under torchrun, `LLM(...)` on a rank other than 0 serves rank 0 and
exits (docs/parallel.md).
`moe_expert_parallel_size=E` / `moe_tensor_parallel_size=M` (TensorRT-LLM's names; E * M must
equal tensor_parallel_size): the MoE layers' experts split E ways and each expert's width M ways
(trtllm/parallel/expert_parallel.py).

A quantized KV cache (FP8 or INT8: half the bytes a token, twice the tokens in the same
memory): `KvCacheConfig(dtype="fp8")` or `QuantConfig(kv_cache_quant_algo=QuantAlgo.INT8)`;
its scales from `kv_cache_scales` (one (k_scale, v_scale) per layer), or an FP8
checkpoint's own k_scale / v_scale for a cache of the format they calibrate
(quantization/checkpoint.py), else as runtime/kv_cache_quant.py says (fp8: 1.0 with a warning; int8:
calibrated on built-in text when the engine is built).

Speculative decoding: `speculative_config=NGramDecodingConfig(...)` or
`DraftTargetDecodingConfig(...)` (TensorRT-LLM's names), or the manual's
`speculative_decoding_config=SpeculativeDecodingConfig(draft_model=..., draft_tokens=4)`
(runtime/speculative; the overlap scheduler then runs only while no sequence speculates).
Images (LLaVA-1.5 / LLaVA-NeXT checkpoints; docs/multimodal.md):
`generate({"prompt": "USER: <image>\\nWhat is this? ASSISTANT:", "multi_modal_data": {"image": [img]}})`
or `generate(inputs={"text": ..., "image": img})`, images as PIL images, numpy arrays or tensors;
the checkpoint's processor (or `processor=`) expands each placeholder.
LoRA adapters (PEFT checkpoints, many in one batch; runtime/adapters.py):
`LLM(..., lora_config=LoraConfig(max_lora_rank=16, max_loras=4))`, then
`generate(prompts, params, lora_request=LoRARequest("math", 1, "path/to/adapter"))` (one for
all prompts, or a list with one per prompt, None for the base model); `generate_async` too.

CUDA graphs (on a GPU): `cuda_graph_config=CudaGraphConfig(batch_sizes=..., max_batch_size=...,
enable_padding=..., max_prefill_tokens=2048)` (TensorRT-LLM's, plus ours: prefill steps of up to
that many tokens replay graphs too; runtime/cuda_graphs.py); none: `cuda_graph_config=None`
(TensorRT-LLM's spelling) or `enable_cuda_graph=False`.

`stream_interval=N` (TensorRT-LLM's name): a streaming request gets an output every N
new tokens (its first at once, its last when it ends) instead of every token: fewer,
larger outputs when many streams run at once.

A request that is bad on its own (empty, over max_input_len, prompt + max_tokens over
max_seq_len, token ids outside the vocabulary, a string that is not valid Unicode) raises
`ValueError` when submitted, naming the prompt (its index in a batch) and the limit; none
of the batch runs. A fault while a request runs ends that request alone; the rest go on:
`generate` then raises `RequestError` naming each failed prompt and its cause (its
`.outputs` hold the whole batch's outputs), a streaming iterator raises it after the
request's last output, and `generate_async` streams end with `.error` set and
finish_reason "error" (what the server turns into an HTTP error). Calls after
`shutdown()` raise at once.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
import torch.nn as nn

from trtllm.config import BuildConfig, CudaGraphConfig, KvCacheConfig, QuantConfig, SchedulerConfig
from trtllm.lora_config import LoraConfig
from trtllm.lora_request import LoRARequest
from trtllm.runtime.build_engine import build_engine, shutdown_workers
from trtllm.runtime.engine_limits import check_cache_salt
from trtllm.runtime.engine_loop import EngineLoop
from trtllm.runtime.engine_stats import EngineStats
from trtllm.runtime.iteration_stats import IterationStats
from trtllm.runtime.llm_args import (
    DEFAULT_CUDA_GRAPHS,
    chat_params,
    check_tensorrt_llm_args,
    cuda_graph_options,
    iteration_stats_option,
    lora_config_of,
    per_prompt,
)
from trtllm.runtime.multimodal_inputs import (
    Processor,
    check_multimodal_encoder,
    is_multimodal_prompt,
    split_chat_images,
)
from trtllm.runtime.multimodal_stager import check_multimodal_request
from trtllm.runtime.outputs import RequestError
from trtllm.runtime.request_stream import RequestStream, StreamingOutputs, new_request_id
from trtllm.runtime.tokenizer import apply_chat_template, check_image_prompt_options, tokenize_prompt
from trtllm.runtime.wire import AddRequest
from trtllm.sampling_params import SamplingParams

__all__ = ["LLM", "StreamingOutputs"]


class LLM:
    """The engine on a thread of this process (`EngineLoop`); answers `EngineClient`, as the
    process client does."""

    def __init__(self, model: str | Path | nn.Module | None = None, tokenizer=None, dtype: str = "auto",
                 kv_cache_config: KvCacheConfig | None = None, build_config: BuildConfig | None = None,
                 quant_config: QuantConfig | None = None, enable_cuda_graph: bool = True,
                 device: str | torch.device | None = None, compile_options: dict | None = None,
                 stream_interval: int = 1, disable_overlap_scheduler: bool = False, kv_cache_scales=None,
                 tensor_parallel_size: int = 1, batched_logits_processor=None, speculative_config=None,
                 speculative_decoding_config=None, lora_config: LoraConfig | None = None, processor=None,
                 multimodal_encoder=None,
                 moe_expert_parallel_size: int | None = None, moe_tensor_parallel_size: int | None = None,
                 pipeline_parallel_size: int = 1, pp_partition: list[int] | None = None,
                 cuda_graph_config: CudaGraphConfig | None | object = DEFAULT_CUDA_GRAPHS,
                 scheduler_config: SchedulerConfig | None = None, max_batch_size: int | None = None,
                 max_num_tokens: int | None = None, max_seq_len: int | None = None, max_input_len: int | None = None,
                 max_beam_width: int | None = None, trust_remote_code: bool = False, backend: str | None = None,
                 skip_tokenizer_init: bool = False, enable_chunked_prefill: bool = True,
                 guided_decoding_backend: str | None = None, enable_lora: bool = False, tokenizer_mode: str = "auto",
                 revision: str | None = None, tokenizer_revision: str | None = None, load_format: str = "auto",
                 enable_iter_perf_stats: bool = False, iter_stats_max_iterations: int | None = None):
        # TensorRT-LLM 1.x's top-level limits, as BuildConfig's; skip_tokenizer_init: no tokenizer
        # loaded, token-id prompts, outputs without text; enable_chunked_prefill=False: a prompt
        # is prefilled in one step (prompt + max_tokens - 1 within max_num_tokens), as TensorRT-LLM's default
        check_tensorrt_llm_args(trust_remote_code, backend, guided_decoding_backend, tokenizer_mode, revision,
                                tokenizer_revision, load_format)
        lora_config = lora_config_of(enable_lora, lora_config)
        stats_iterations = iteration_stats_option(enable_iter_perf_stats, iter_stats_max_iterations)
        limits = dict(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                      max_input_len=max_input_len, max_beam_width=max_beam_width)
        if batched_logits_processor is not None and not callable(batched_logits_processor):
            raise TypeError("batched_logits_processor must be callable (a BatchedLogitsProcessor)")
        check_multimodal_encoder(multimodal_encoder, model)
        if speculative_config is not None and speculative_decoding_config is not None:
            raise ValueError("give speculative_config or speculative_decoding_config (the same thing), not both")
        enable_cuda_graph, cuda_graph_config = cuda_graph_options(enable_cuda_graph, cuda_graph_config)
        self.engine = build_engine(model, tokenizer, dtype, kv_cache_config, build_config, quant_config,
                                   enable_cuda_graph, device, compile_options, stream_interval,
                                   disable_overlap_scheduler, kv_cache_scales, tensor_parallel_size,
                                   speculative_config or speculative_decoding_config, lora_config,
                                   moe_expert_parallel_size, moe_tensor_parallel_size,
                                   pipeline_parallel_size, pp_partition, cuda_graph_config,
                                   scheduler_config=scheduler_config, limits=limits,
                                   skip_tokenizer_init=skip_tokenizer_init,
                                   enable_chunked_prefill=enable_chunked_prefill)
        self.engine.logits_hooks.batched_logits_processor = batched_logits_processor  # TensorRT-LLM's name
        self._iteration_stats = IterationStats.observe(self.engine, stats_iterations) if stats_iterations else None
        self.tokenizer, self.limits, self.vocab_size = self.engine.tokenizer, self.engine.limits, self.engine.vocab_size
        # a multimodal model's image processor: given, else the checkpoint's, loaded at the first image
        image_token_id = getattr(self.engine.runner.compiled.module.config, "image_token_id", None) \
            if self.engine.runner.multimodal is not None else None
        self.processor = Processor(processor, model, self.tokenizer, image_token_id)
        self.block_manager, self.compiled = self.engine.block_manager, self.engine.runner.compiled
        self._loop = EngineLoop(self.engine)
        self._shut_down = False

    # -- generation --------------------------------------------------------------------
    def generate(self, prompts=None, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, streaming: bool = False,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None, inputs=None,
                 cache_salt: str | Seq[str | None] | None = None):
        """RequestOutputs for a prompt or a list; with streaming=True (one prompt), an
        iterator of growing RequestOutputs (closing it, or dropping it, aborts the request).
        lora_request: one adapter for every prompt, or a list of one per prompt (None: the base).
        A prompt with images (a multimodal model): `{"prompt": text, "multi_modal_data": {"image":
        [images]}}` or `{"text": text, "image": image}` (runtime/multimodal_inputs.py); `inputs=`
        is TensorRT-LLM's name for `prompts`. cache_salt (TensorRT-LLM's): one string for every prompt or
        a list of one per prompt; cached prefixes are shared only among requests of one salt (None: no salt)."""
        self._check_running()
        if inputs is not None:
            if prompts is not None:
                raise ValueError("give prompts or inputs (the same thing), not both")
            prompts = inputs
        if getattr(prompts, "ndim", None) == 2:  # a 2-D array or tensor of token ids: one prompt a row
            prompts = list(prompts)
        if streaming:
            if _is_batch(prompts):
                raise ValueError("streaming=True takes one prompt; use generate_async for several")
            if isinstance(lora_request, (list, tuple)) or isinstance(cache_salt, (list, tuple)):
                raise ValueError("streaming=True takes one prompt, one lora_request and one cache_salt, not a list")
            return StreamingOutputs(self._submit(prompts, sampling_params, streaming=True, lora_request=lora_request,
                                                 cache_salt=cache_salt), self._loop)
        batch = _is_batch(prompts)
        prompts = list(prompts) if batch else [prompts]
        params, loras, salts = (per_prompt(value, len(prompts), name) for value, name in (
            (sampling_params, "sampling_params"), (lora_request, "lora_requests"), (cache_salt, "cache_salts")))
        # every prompt checked and tokenized first, then all handed over in one message:
        # a bad one raises before any runs, and the engine's first step sees the whole
        # batch (one at a time, the engine thread started stepping on the first few while
        # the rest came in: batches formed differently from run to run)
        requests = []
        for i, (p, sp, lora, salt) in enumerate(zip(prompts, params, loras, salts)):
            try:
                requests.append(self._prepare(new_request_id(), p, sp, lora_request=lora, cache_salt=salt))
            except (ValueError, TypeError) as e:
                if not batch:
                    raise
                raise (TypeError if isinstance(e, TypeError) else ValueError)(f"prompt {i}: {e}") from None
        streams = self._loop.submit_many(requests)
        results = []
        progress = _progress(len(streams)) if use_tqdm and len(streams) > 1 else None
        for stream in streams:
            results.append(stream.result())
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        failed = [i for i, out in enumerate(results) if out.error is not None]
        if failed:  # never an empty success
            raise RequestError(results, failed, batch)
        return results if batch else results[0]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True):
        """`generate` on chat messages (`[{"role": "user", "content": "Hi"}]`, or a list of such
        conversations), rendered with the checkpoint's own chat template. A multimodal model's
        content may be a list of parts, `{"type": "image", "image": img}` among the text ones:
        each becomes the model's placeholder where it stands."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (and its chat template); this LLM was built without one")
        batch = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = messages if batch else [messages]
        given = list(sampling_params) if isinstance(sampling_params, (list, tuple)) \
            else [sampling_params] * len(conversations)
        prompts, params = [], []
        for conversation, sp in zip(conversations, given, strict=False):
            token = self.processor.image_token if self.processor.takes_images else None
            conversation, images = split_chat_images(conversation, token)
            text = apply_chat_template(self.tokenizer, conversation, add_generation_prompt)
            prompts.append({"prompt": text, "multi_modal_data": {"image": images}} if images else text)
            params.append(sp if images else chat_params(sp))  # an image prompt is the processor's to tokenize
        if len(given) != len(conversations):  # generate names the mismatch
            params = sampling_params
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm)
        return outputs if batch else outputs[0]

    def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                       streaming: bool = False, request_id: str | None = None,
                       lora_request: LoRARequest | None = None, multimodal=None,
                       cache_salt: str | None = None) -> RequestStream:
        """A RequestStream: `async for out in stream` (streaming) or `await stream.aresult()`.
        multimodal: the images of a prompt already processed (token ids with the placeholders
        expanded; `processor.process` gives both), as the server sends them."""
        self._check_running()
        return self._loop.submit(self._prepare(request_id or new_request_id(), prompt, sampling_params, streaming,
                                               lora_request, multimodal, cache_salt), asyncio.get_running_loop())

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    def _submit(self, prompt, params: SamplingParams | None, loop=None, request_id: str | None = None,
                streaming: bool = False, lora_request: LoRARequest | None = None,
                cache_salt: str | None = None) -> RequestStream:
        return self._loop.submit(self._prepare(request_id or new_request_id(), prompt, params, streaming,
                                               lora_request, cache_salt=cache_salt), loop)

    def _prepare(self, request_id: str, prompt, params: SamplingParams | None, streaming: bool = False,
                 lora_request: LoRARequest | None = None, multimodal=None, cache_salt: str | None = None) -> AddRequest:
        """One request, tokenized; TypeError/ValueError if bad."""
        if isinstance(prompt, dict) and "cache_salt" in prompt:  # vLLM's spelling: the salt in the prompt
            salt = prompt["cache_salt"]  # None there: no salt of its own (generate's, if any, applies)
            if salt is not None and cache_salt is not None and cache_salt != salt:
                raise ValueError("two cache salts: the prompt's 'cache_salt' and generate's cache_salt; give one")
            prompt, cache_salt = {k: v for k, v in prompt.items() if k != "cache_salt"}, \
                cache_salt if salt is None else salt
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if multimodal is not None:  # processed already (the server)
            check_image_prompt_options(params)
            text, ids = tokenize_prompt(self.tokenizer, prompt)
        elif is_multimodal_prompt(prompt):
            check_image_prompt_options(params)
            text, ids, multimodal = self.processor.process(prompt)
        else:
            text, ids = tokenize_prompt(self.tokenizer, prompt, params)
        self.engine.validate(ids, params)
        check_multimodal_request(self.engine.runner.multimodal, multimodal, ids)
        multimodal = multimodal if multimodal is not None and multimodal.images else None
        self.engine.check_lora(lora_request)
        return AddRequest(request_id, ids, params, text, streaming, lora_request, multimodal,
                          check_cache_salt(cache_salt))

    def _check_running(self) -> None:
        if self._shut_down:
            raise RuntimeError("this LLM was shut down (shutdown() or the end of its `with` block): "
                               "build a new LLM to generate")
        if not self._loop.is_alive():
            raise RuntimeError("this LLM's engine thread has stopped (a fatal error in a step; see the "
                               "error of the requests it was running): build a new LLM")

    # -- the rest of what a server asks of an engine (EngineClient) ---------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with this request, before submitting it."""
        self.engine.validate(prompt_token_ids, params)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def is_alive(self) -> bool:
        return self._loop.is_alive()

    def dead_reason(self) -> str | None:
        return None if self._loop.is_alive() else "the engine shut down"

    def engine_stats(self) -> EngineStats:
        """Scheduler and KV-pool counters (plain integer reads; the engine is not locked)."""
        return EngineStats.of(self.engine)

    def get_stats(self, timeout: float | None = None) -> list[dict]:
        """TensorRT-LLM's: the per-iteration stats recorded since the last call, oldest first
        (runtime/iteration_stats.py; `timeout` is accepted for its signature: nothing waits).
        Needs LLM(enable_iter_perf_stats=True); `engine_stats()` is the counters now."""
        if self._iteration_stats is None:
            raise ValueError("get_stats() needs LLM(enable_iter_perf_stats=True) (per-iteration stats are not "
                             "recorded without it); engine_stats() gives the scheduler's and KV pool's counters now")
        return self._iteration_stats.drain()

    async def get_stats_async(self, timeout: float | None = None):
        """TensorRT-LLM's: get_stats()'s dicts as an async iterator."""
        for stats in self.get_stats(timeout):
            yield stats

    def get_kv_cache_events(self, timeout: float | None = None) -> list[dict]:
        """TensorRT-LLM's: the KV-cache events since the last call, oldest first
        (runtime/kv_cache_events.py). Needs KvCacheConfig(event_buffer_max_size=N)."""
        events = self.engine.block_manager.events
        if events is None:
            raise ValueError("get_kv_cache_events() needs LLM(kv_cache_config=KvCacheConfig(event_buffer_max_size=N)) "
                             "(events are not recorded without it)")
        return events.drain()

    async def get_kv_cache_events_async(self, timeout: float | None = None):
        """TensorRT-LLM's: get_kv_cache_events()'s events as an async iterator."""
        for event in self.get_kv_cache_events(timeout):
            yield event

    # -- lifetime ----------------------------------------------------------------------
    def shutdown(self) -> None:
        self._shut_down = True
        self._loop.shutdown()
        shutdown_workers(self.engine)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _is_batch(prompts) -> bool:
    """A list of prompts (strings or token-id lists), not one prompt of token ids."""
    return isinstance(prompts, (list, tuple)) and (not prompts or not isinstance(prompts[0], int))


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="generate", unit="req")
