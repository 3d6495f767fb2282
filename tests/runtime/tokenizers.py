"""Tiny tokenizers for tests (trained here in milliseconds; no downloads).

    make_tokenizer(directory, chat_template=None, kind="byte_level") -> Path
    byte_token_ids(tokenizer, text) -> ids spelling `text` one UTF-8 byte per token

`kind="byte_level"` is a GPT-2 / Llama-3 style byte-level BPE: every one of the 256
bytes is a token, so any text encodes and multi-byte characters ("é", "日本", "🙂")
can be split across tokens. `kind="metaspace"` is a SentencePiece-style BPE (Llama-2,
Mistral): spaces become "▁" glued to the next word, and decoding strips the leading
space of the first token, which is what incremental detokenization must get right.

Both have the special tokens in SPECIAL_TOKENS (eos "<|endoftext|>") and save with
`save_pretrained`, so `AutoTokenizer.from_pretrained(directory)` loads them. Other
tests write one next to a checkpoint:
`from tests.runtime.tokenizers import make_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "Hello world, hello there. The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, déjà vu: résumé and naïve façade.",
    "日本語のテキスト。日本は東京です。",
    "Emoji: 🙂 😀 🎉 and more 🙂🙂 text.",
    "def f(x):\n    return x * 2  # code, with 'quotes' and \"doubles\"",
    "Numbers 0123456789 and symbols !@#$%^&*()[]{}<>?/|\\~`",
]

# A ChatML template, as Qwen ships: good enough to test that the tokenizer's own is used.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _train(kind: str) -> Tokenizer:
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # Every byte is a token (initial_alphabet), so random ids and any text work.
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIAL_TOKENS],
                                      show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def make_tokenizer(directory: str | Path, chat_template: str | None = None,
                   kind: str = "byte_level") -> Path:
    """Train a tiny tokenizer and save_pretrained it into `directory` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = dict(eos_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:],
                  clean_up_tokenization_spaces=False)
    if kind == "metaspace":
        kwargs["unk_token"] = "<unk>"
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    PreTrainedTokenizerFast(tokenizer_object=_train(kind), **kwargs).save_pretrained(directory)
    return directory


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel spells bytes with)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """Ids of a byte-level tokenizer spelling `text` one UTF-8 byte per token."""
    table = _bytes_to_unicode()
    ids = tokenizer.convert_tokens_to_ids([table[b] for b in text.encode("utf-8")])
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None
    return ids
