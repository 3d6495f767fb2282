"""From a validated OpenAI request body to a `Job` (serve/render.py): every check first, nothing
submitted until all pass (serve/handler.py runs the job).

    jobs = JobBuilder(llm, served_model_name, lora_modules, media)
    job = await jobs.completion_job(body)   # or chat_job; RequestError naming what is bad

A job's model (the base model or a `--lora_modules` adapter), sampling values, structured-output
constraint, tools and images are checked, and every prompt tokenized and passed through
`EngineClient.validate`, so a bad request never reaches the engine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import uuid

from trtllm.lora_request import LoRARequest
from trtllm.runtime.client_protocol import EngineClient
from trtllm.runtime.multimodal_inputs import check_image_tokens
from trtllm.runtime.tokenizer import apply_chat_template
from trtllm.sampling_params import SamplingParams
from trtllm.serve.errors import RequestError
from trtllm.serve.media import MediaPolicy, process_images
from trtllm.serve.protocol import DEFAULT_COMPLETION_MAX_TOKENS, ChatCompletionRequest, CompletionRequest
from trtllm.serve.render import Job
from trtllm.serve.responses import ResponsesRequest
from trtllm.serve.tools import ToolError, ToolPlan

_BIG_TEXT = 16384  # characters: longer prompts are tokenized on a worker thread, off the event loop


class JobBuilder:
    def __init__(self, llm: EngineClient, served_model_name: str, lora_modules: dict[str, LoRARequest] | None = None,
                 media: MediaPolicy | None = None):
        self.llm, self.name = llm, served_model_name
        # images in chat requests (serve/media.py): the operator's policy, the engine's processor
        self.media = media if media is not None else MediaPolicy()
        self.processor = getattr(llm, "processor", None)  # None: an engine client without images
        self.lora_modules = dict(lora_modules or {})  # adapter name -> its request (trtllm-serve --lora_modules)
        self.tokenizer = llm.tokenizer

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter `model` names (vLLM's convention), None for the base model; 404 if neither."""
        if model is None or model == self.name:
            return None
        if model in self.lora_modules:
            return self.lora_modules[model]
        served = ", ".join(map(repr, [self.name, *self.lora_modules]))
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")

    async def completion_job(self, body: CompletionRequest) -> Job:
        body.refuse_invalid_text()
        lora_request = self.check_model(body.model)
        body.refuse_unsupported()
        prompts = body.prompts()
        guide, guide_param = body.guide()
        # max_tokens=0 (echo): the engine runs one step for the prompt's logprobs; its token is dropped
        max_tokens = 1 if body.prompt_only else body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        params = body.sampling_params(max_tokens, body.logprobs, guide, self.llm.vocab_size,
                                      prompt_logprobs=body.logprobs if body.echo else None, guide_param=guide_param)
        tokenized = [await self._tokenize(p, add_special_tokens=True) for p in prompts]
        for _text, ids in tokenized:
            self._validate(ids, params, "prompt", guide_param)
            self._check_image_tokens(ids, None, "prompt")
        return Job("completions", f"cmpl-{uuid.uuid4().hex}", tokenized, [params] * len(tokenized),
                   body.logprobs, body.stream, bool(body.stream_options and body.stream_options.include_usage),
                   echo=body.echo, prompt_only=body.prompt_only, lora_request=lora_request,
                   cache_salt=body.cache_salt)

    async def chat_job(self, body: ChatCompletionRequest) -> Job:
        body.refuse_invalid_text()
        lora_request = self.check_model(body.model)
        body.refuse_unsupported()
        takes_images = self.processor is not None and self.processor.takes_images
        urls = body.image_urls()
        if urls and not takes_images:
            raise RequestError(400, "messages: an image_url content part, but this model takes no images (a "
                                    "text-only model)", param="messages")
        messages = body.checked_messages(self.processor.image_token if urls else None)
        if self.tokenizer is None:
            raise RequestError(400, "this model has no tokenizer, so no chat template; use /v1/completions "
                                    "with token ids", param="messages")
        guide, guide_param = body.guide()
        try:
            plan = ToolPlan.of(body.tools, body.tool_choice, body.parallel_tool_calls)
        except ToolError as e:
            raise RequestError(400, str(e), param=e.param) from None
        if plan is not None and plan.template_tools is not None:
            if "tools" not in str(getattr(self.tokenizer, "chat_template", "") or ""):
                raise RequestError(400, "tools: the checkpoint's chat template does not render tools, so the model "
                                        "would never see them", param="tools")
            if plan.guide is not None:
                if guide is not None:
                    raise RequestError(400, f"tool_choice {plan.mode!r} constrains the output itself: it cannot be "
                                            f"combined with {guide_param}", param=guide_param)
                guide, guide_param = plan.guide, "tools"
        try:
            text = apply_chat_template(self.tokenizer, messages, body.add_generation_prompt,
                                       tools=plan.template_tools if plan is not None else None)
        except ValueError as e:
            raise RequestError(400, str(e), param="messages") from None
        except Exception as e:  # the template's own checks (e.g. roles must alternate)
            raise RequestError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        multimodal = None
        if urls:  # decoded (under the policy's caps) and processed off the event loop
            text, ids, multimodal = await process_images(self.processor, text, urls, self.media)
        else:
            _, ids = await self._tokenize(text, add_special_tokens=False)
        max_tokens = body.requested_max_tokens
        if max_tokens is None:  # OpenAI's default: up to the end of the context (or of one step's tokens,
            lim = self.llm.limits  # without chunked prefill: the engine's rule, runtime/engine_limits.py)
            end = lim.max_seq_len if lim.chunked_prefill else min(lim.max_seq_len, lim.max_num_tokens + 1)
            if len(ids) >= end:  # refused for the prompt (the engine's refusal named a max_tokens never sent)
                limit = f"max_seq_len={lim.max_seq_len}" if end == lim.max_seq_len else \
                    f"max_num_tokens={lim.max_num_tokens}, chunked prefill off"
                raise RequestError(400, f"messages: the prompt ({len(ids)} tokens) leaves no room for a completion "
                                        f"of even one token ({limit})", param="messages")
            max_tokens = end - len(ids)
        params = body.sampling_params(max_tokens, body.num_logprobs, guide, self.llm.vocab_size,
                                      guide_param=guide_param)
        self._validate(ids, params, "messages", guide_param)
        self._check_image_tokens(ids, multimodal, "messages")
        return Job("chat", f"chatcmpl-{uuid.uuid4().hex}", [(text, ids)], [params], body.num_logprobs,
                   body.stream, bool(body.stream_options and body.stream_options.include_usage),
                   tools=plan if plan is not None and plan.mode != "none" else None, lora_request=lora_request,
                   multimodal=multimodal, cache_salt=body.cache_salt)

    async def responses_job(self, body: ResponsesRequest) -> Job:
        """/v1/responses: the chat it means (serve/responses.py), checked as a chat."""
        job = await self.chat_job(body.chat_request())
        return dataclasses.replace(job, endpoint="responses", id=f"resp_{uuid.uuid4().hex}",
                                   request_fields={"instructions": body.instructions, "metadata": body.metadata or {},
                                                   "max_output_tokens": body.max_output_tokens,
                                                   "text": body.text or {"format": {"type": "text"}},
                                                   "tools": body.tools or [], "tool_choice": body.tool_choice or
                                                   ("auto" if body.tools else "none")})

    async def _tokenize(self, prompt, add_special_tokens: bool) -> tuple[str | None, list[int]]:
        if not isinstance(prompt, str):
            return None, list(prompt)
        if self.tokenizer is None:
            raise RequestError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        encode = lambda: self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)  # noqa: E731
        ids = await asyncio.to_thread(encode) if len(prompt) > _BIG_TEXT else encode()
        return prompt, ids

    def _check_image_tokens(self, ids: list[int], multimodal, what: str) -> None:
        """A multimodal model's image placeholder in a prompt only where an image fills it (400)."""
        try:
            check_image_tokens(self.processor.image_token_id if self.processor is not None else None, multimodal, ids)
        except ValueError as e:
            raise RequestError(400, f"{what}: {e}", param=what) from None

    def _validate(self, ids: list[int], params: SamplingParams, what: str, guide_param: str | None = None) -> None:
        try:
            self.llm.validate(ids, params)
        except ValueError as e:
            msg = str(e)
            if guide_param is not None and msg.startswith("guided_decoding"):  # named as the request named it
                raise RequestError(400, guide_param + msg[msg.find(":"):], param=guide_param) from None
            if msg.startswith("SamplingParams.stop_token_ids"):  # the request's own field, named as it named it
                raise RequestError(400, msg.removeprefix("SamplingParams."), param="stop_token_ids") from None
            if msg.startswith("beam width"):  # the width is best_of, or n
                raise RequestError(400, msg, param="best_of" if params.best_of is not None else "n") from None
            raise RequestError(400, msg, param="max_tokens" if "max_tokens" in msg else what) from None
