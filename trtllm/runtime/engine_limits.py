"""What an engine accepts: its size limits and the checks a request passes before any work
(the engine's own `validate`, and the process client's before it sends)."""
from __future__ import annotations

from dataclasses import dataclass

from trtllm.runtime.guides import validate_guided
from trtllm.sampling_params import SamplingParams


@dataclass
class EngineLimits:
    max_num_seqs: int
    max_num_tokens: int
    max_input_len: int
    max_seq_len: int
    max_beam_width: int = 1
    chunked_prefill: bool = True  # False: a prompt is computed in one step (LLM(enable_chunked_prefill=False))


def validate_request(prompt_token_ids: list[int], params: SamplingParams, lim: EngineLimits, vocab_size: int,
                     has_tokenizer: bool) -> None:
    """Raise ValueError saying what is wrong with a request."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    if n > lim.max_input_len:
        raise ValueError(f"the prompt has {n} tokens, more than max_input_len={lim.max_input_len}")
    if n + params.max_tokens > lim.max_seq_len:
        raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds "
                         f"max_seq_len={lim.max_seq_len}")
    if not lim.chunked_prefill and n + params.max_tokens - 1 > lim.max_num_tokens:
        # (a preempted sequence recomputes its prompt and outputs in one step: the scheduler's rule)
        raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) - 1 exceeds max_num_tokens "
                         f"({lim.max_num_tokens}) and chunked prefill is off")
    if params.is_beam_search and params.num_beams > lim.max_beam_width:
        raise ValueError(f"beam width {params.num_beams} exceeds max_beam_width={lim.max_beam_width} (BuildConfig)")
    if params.is_beam_search and params.num_beams > lim.max_num_seqs:  # a group's beams run together
        raise ValueError(f"beam width {params.num_beams} exceeds max_batch_size={lim.max_num_seqs}")
    if params.stop and not has_tokenizer:  # (SamplingParams refuses stop strings without detokenize)
        raise ValueError("stop strings need a tokenizer; this LLM was built without one")
    if params.bad and not has_tokenizer:
        raise ValueError("SamplingParams.bad (banned words) needs a tokenizer; this LLM was built without one: "
                         "ban token ids with bad_token_ids")
    if params.embedding_bias is not None and params.embedding_bias.shape != (vocab_size,):
        raise ValueError(f"SamplingParams.embedding_bias has shape {tuple(params.embedding_bias.shape)}, not the "
                         f"vocabulary's ({vocab_size},)")
    if params.end_id is not None and params.end_id >= vocab_size:
        raise ValueError(f"SamplingParams.end_id {params.end_id} is outside the vocabulary [0, {vocab_size})")
    for field in ("bad_token_ids", "stop_token_ids"):  # an id the model never samples: never banned, never a stop
        bad = next((t for t in getattr(params, field) if t >= vocab_size), None)
        if bad is not None:
            raise ValueError(f"SamplingParams.{field}: {bad} is outside the vocabulary [0, {vocab_size})")
    validate_guided(params, has_tokenizer)


def check_stream_interval(stream_interval) -> None:
    if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
        raise ValueError(f"stream_interval must be an integer >= 1, got {stream_interval!r}")


MAX_CACHE_SALT_CHARS = 1024  # a tenant's key, not a document: hashed into each prompt's first block


def check_cache_salt(salt) -> str | None:
    """A request's cache salt (TensorRT-LLM's and vLLM's `cache_salt`): a non-empty string, or None."""
    if salt is None:
        return None
    if not isinstance(salt, str):
        raise TypeError(f"cache_salt must be a string, got {type(salt).__name__}")
    if not 0 < len(salt) <= MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt must be 1..{MAX_CACHE_SALT_CHARS} characters, got {len(salt)}")
    try:
        salt.encode()  # (hashed as UTF-8 in the engine's step: a lone surrogate failed every request of it)
    except UnicodeEncodeError as e:
        raise ValueError(f"cache_salt must be valid Unicode text: {e.reason} at character {e.start}") from None
    return salt
