"""Tokenizer side of the runtime: loading, incremental detokenization, stop strings, chat.

    load_tokenizer(path_or_tokenizer) -> transformers tokenizer
    IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=True)
        .append(token_id) -> str    newly stable text
        .flush() -> str             whatever is still held back (call when the sequence ends)
        .text                       all text emitted so far
    find_stop_span(text, stop, start) -> (begin, end) | None   the earliest stop string
    special_stop_tokens(tokenizer, params) -> {id: stop string}  those matched as a skipped special token
    safe_prefix_len(text, stop) -> int                how much of text may be streamed
    apply_chat_template(tokenizer, messages, add_generation_prompt=True) -> str

Streaming a request, per new token (`det` its detokenizer, `stop` its stop strings):

    start = len(det.text)
    det.append(token_id)
    span = find_stop_span(det.text, stop, start)
    if span is not None: finish; the output text is det.text[:span[0]]
    else: stream det.text[emitted:safe_prefix_len(det.text, stop)]

so a client never sees text that a later token turns into (the start of) a stop string.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer

from trtllm.models.checkpoint_config import TOKENIZER_FILES

# Tokens of left context the detokenizer decodes with (vLLM uses the same number):
# enough for a SentencePiece "▁" to become a space, and for a character whose bytes
# span tokens to be whole in the window.
_CONTEXT_TOKENS = 5

_REPLACEMENT = "\ufffd"  # what decoding gives for an incomplete UTF-8 sequence


def load_tokenizer(path_or_tokenizer):
    """A transformers tokenizer from a local checkpoint directory, or the one given.

    Only local files are read (no hub downloads) and no remote code runs.
    """
    if not isinstance(path_or_tokenizer, (str, os.PathLike)):
        return path_or_tokenizer  # already built
    path = Path(path_or_tokenizer)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {str(path)!r}: expected one of "
                                f"{', '.join(TOKENIZER_FILES)}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as e:  # name the directory; transformers' messages often do not
        raise ValueError(f"could not load the tokenizer in {str(path)!r}: {e}") from e


def tokenize_prompt(tokenizer, prompt, params=None) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a prompt given as a string, or as token ids: a list or
    tuple of ints, or a 1-D integer numpy array or torch tensor. With SamplingParams: a text
    prompt tokenized with or without special tokens (`add_special_tokens`), then only its last
    `truncate_prompt_tokens` ids kept. TensorRT-LLM's (and vLLM's) TextPrompt {"prompt": text} and
    TokensPrompt {"prompt_token_ids": ids} are the text or the ids they hold."""
    if isinstance(prompt, dict):
        prompt = _typed_prompt(prompt)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or LLM(tokenizer=...)")
        check_encodable(prompt, "the prompt")
        text, ids = prompt, tokenizer.encode(prompt, add_special_tokens=params is None or params.add_special_tokens)
    else:
        text, ids = None, token_ids(prompt)
        if ids is None:
            raise TypeError(f"a prompt is a string or a list of token ids, got {_describe(prompt)}")
    keep = params.truncate_prompt_tokens if params is not None else None
    return text, ids[-keep:] if keep is not None else ids


def _typed_prompt(prompt: dict):
    """The text of {"prompt": text} (or {"text": text}), the ids of {"prompt_token_ids": ids}."""
    keys = set(prompt)
    if keys in ({"prompt"}, {"text"}) and isinstance(prompt.get("prompt", prompt.get("text")), str):
        return prompt.get("prompt", prompt.get("text"))
    if keys == {"prompt_token_ids"} and token_ids(prompt["prompt_token_ids"]) is not None:
        return prompt["prompt_token_ids"]
    raise TypeError(f"a dict prompt is {{'prompt': text}}, {{'prompt_token_ids': [ids]}} or, with images, "
                    f"{{'prompt': text, 'multi_modal_data': {{'image': [...]}}}}; got keys {sorted(keys, key=str)}"
                    + ("" if keys - {"prompt", "text", "prompt_token_ids"} else " holding other types"))


def check_image_prompt_options(params) -> None:
    """A prompt with images is the processor's to tokenize: refuse what would change its ids."""
    if params.truncate_prompt_tokens is not None or not params.add_special_tokens:
        raise ValueError("truncate_prompt_tokens / add_special_tokens=False with images are not supported: "
                         "the processor places the image tokens")


def _describe(prompt) -> str:
    """The type of a rejected prompt, and of its first non-int element if it is a list or tuple."""
    if isinstance(prompt, (list, tuple)):
        bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            return f"a {type(prompt).__name__} holding {type(bad).__name__} {bad!r:.40}"
    return type(prompt).__name__


def token_ids(prompt) -> list[int] | None:
    """The prompt as a list of Python ints if it is token ids, else None."""
    if isinstance(prompt, (list, tuple)):
        return list(prompt) if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt) else None
    shape, dtype = getattr(prompt, "shape", None), getattr(prompt, "dtype", None)
    if shape is None or dtype is None or len(shape) != 1:
        return None
    if str(dtype).removeprefix("torch.") not in ("int8", "int16", "int32", "int64", "uint8", "uint16",
                                                 "uint32", "uint64"):
        return None
    return [int(t) for t in prompt.tolist()]


def check_encodable(text: str, what: str) -> None:
    """ValueError if `text` holds a lone surrogate (valid in a Python str or JSON's \\uDCFF,
    but no UTF-8 text: tokenizers would fail with a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds {text[e.start]!r} at character {e.start}, a lone UTF-16 surrogate: "
                         "not valid Unicode text") from None


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, one token at a time.

    Each `append` decodes a short window of ids and returns what it adds to the text
    of the window's context (vLLM's prefix/read offsets, the older ids dropped):

        window:  | context: text emitted already | unread: not emitted yet |
                 0                          _read_offset                  end

    The left context makes SentencePiece's leading "▁" come out as a space (decoded
    alone, a first token loses it), and the window starts where earlier text was
    complete, so no character is cut. While the window's text ends in U+FFFD, a
    multi-byte character is still incomplete (byte-level BPE splits "🙂" across
    tokens): it is held back until it completes, or until `flush`.

    The first output tokens are decoded with the prompt's last tokens as context. For
    byte-level BPE (GPT-2, Llama 3, Qwen) the concatenated output then equals
    `tokenizer.decode(output_ids)`; for SentencePiece (Llama 2, Mistral) it keeps the
    space a first "▁word" token stands for, as `decode(prompt + output)` minus
    `decode(prompt)` does, so that prompt + text reads right. Decoding never applies
    `clean_up_tokenization_spaces` (a whole-text heuristic that drops spaces before
    punctuation; transformers itself skips it for BPE).
    """

    def __init__(self, tokenizer, prompt_token_ids, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.output_token_ids: list[int] = []
        self.text = ""
        # The window: _ids[:_read_offset] is context whose text (_prefix_text) has been
        # emitted (or is the prompt's); _ids[_read_offset:] is not emitted yet. Older
        # ids are dropped, so a long generation keeps a short list.
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        if self._prefix_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character: the output's first bytes cannot
            # complete text that is not ours to emit, so decode the output on its own.
            self._ids, self._read_offset, self._prefix_text = [], 0, ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> str:
        """Add one output token; return the text that became stable (maybe "")."""
        self.output_token_ids.append(token_id)
        self._ids.append(token_id)
        return self._advance(self._decode(self._ids), final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished character, as U+FFFD); call at the end."""
        return self._advance(self._decode(self._ids), final=True)

    def _advance(self, new_text: str, final: bool) -> str:
        # An unfinished character decodes as trailing U+FFFD: hold it back. What comes
        # before it is settled, whatever bytes follow.
        stable = new_text if final else new_text.rstrip(_REPLACEMENT)
        if len(stable) <= len(self._prefix_text):
            return ""  # nothing new (a skipped special token), or only an unfinished character
        delta = stable[len(self._prefix_text):]
        self.text += delta
        if len(stable) < len(new_text):
            # Keep the window (its tail may still complete); remember what was sent.
            self._prefix_text = stable
        else:
            # Slide the window: the ids just read become the context. Their text is
            # decoded again rather than sliced from new_text, since decoded first in a
            # window a SentencePiece token loses its leading space.
            self._ids = self._ids[self._read_offset:]
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids)
        return delta


def find_stop_span(text: str, stop: list[str], start: int) -> tuple[int, int] | None:
    """(begin, end) of the stop string in `text` that begins earliest, or None.

    Only matches that end after `start` (the length of the text already checked) are
    looked for, so each call costs the new text plus the longest stop string, not the
    whole text. Of stop strings beginning at the same place the shortest wins: it was
    complete first.
    """
    best = None
    for s in stop:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or (i, i + len(s)) < best):
            best = (i, i + len(s))
    return best


def special_stop_tokens(tokenizer, params) -> dict[int, str]:
    """{token id: stop string} for the stop strings that are the text of a special token which
    skip_special_tokens leaves out of the output text (ChatML's "<|im_end|>"): matched in the
    text they never would be, so they are matched as that token."""
    if tokenizer is None or not params.stop or not params.skip_special_tokens or not params.detokenize:
        return {}
    found = {}
    for s in params.stop:
        token = tokenizer.convert_tokens_to_ids(s)
        if isinstance(token, int) and tokenizer.convert_ids_to_tokens(token) == s \
                and _decode_one(tokenizer, token, skip=True) == "" and _decode_one(tokenizer, token, skip=False) == s:
            found.setdefault(token, s)
    return found


def _decode_one(tokenizer, token: int, skip: bool) -> str:
    return tokenizer.decode([token], skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def safe_prefix_len(text: str, stop: list[str]) -> int:
    """Length of the prefix of `text` that may be streamed.

    The rest is the longest tail of `text` that is a proper prefix of a stop string:
    the next tokens may complete it, and then it must never have been sent.
    """
    hold = 0
    for s in stop:
        # The earliest place, among the last len(s)-1 characters, where a prefix of s
        # starts gives the longest tail to hold for s.
        i = text.find(s[0], max(0, len(text) - len(s) + 1)) if s else -1
        while i >= 0:
            if s.startswith(text[i:]):
                hold = max(hold, len(text) - i)
                break
            i = text.find(s[0], i + 1)
    return len(text) - hold


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> str:
    """Render `messages` with the checkpoint's own chat template, as a prompt string.

    There is deliberately no way to pass a template: a template is code (Jinja), so
    the server must never accept one from a request; it uses the checkpoint's only.
    `tools`: OpenAI's tool objects, for the template's own `tools` variable.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise ValueError(f"the checkpoint has no chat template ({name}: no chat_template in "
                         "tokenizer_config.json and no chat_template.jinja); send a plain "
                         "prompt (completions) instead of chat messages")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **({"tools": tools} if tools else {}))
