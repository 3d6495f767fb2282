"""The built-in demo model: a small Llama trained on Debian's fortune cookies.

    DEMO_MODEL_DIR                      Path of the checkpoint shipped inside the package
    demo_model_path() -> Path           DEMO_MODEL_DIR, or a clear error if its files are missing
    read_entries(path) -> list[str]     a corpus file's entries (separated by blank lines)
    pack(tokenizer, entries) -> list[int]
                                        <|bos|> entry <|eos|>, entry after entry (as trained)
    perplexity(model, token_ids, seq_len) -> (ppl, n_tokens)
                                        token-level, fp32, over a packed stream
    greedy_generate(model, tokenizer, prompt, max_new_tokens) -> str
                                        eager argmax loop (the reference, no cache)

The checkpoint is an ordinary HF checkpoint directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template), loaded by the same code as
any other: ``trtllm.load_model(demo_model_path())``. It is written by
``tools/train_demo_model.py`` from the corpus of ``tools/fetch_corpus.sh``; its
``training.json`` records how, and the held-out perplexity it reached, also on the small
held-out file shipped beside it (``heldout_sample.txt``) that the tests re-measure.
See docs/demo_model.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
# What a checkpoint directory needs to be loaded by trtllm.load_model and AutoTokenizer.
DEMO_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
HELDOUT_SAMPLE = "heldout_sample.txt"


def demo_model_path() -> Path:
    """The shipped demo checkpoint directory; FileNotFoundError naming what is missing."""
    missing = [name for name in DEMO_MODEL_FILES if not (DEMO_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the built-in demo model is incomplete: {', '.join(missing)} missing from {DEMO_MODEL_DIR} "
            "(an install without package data?). Reinstall trtllm, or rebuild it with "
            "`tools/fetch_corpus.sh && python tools/train_demo_model.py --out trtllm/demo_model`, "
            "or pass a checkpoint directory explicitly.")
    return DEMO_MODEL_DIR


def read_entries(path: str | Path) -> list[str]:
    """Entries of a corpus file: text blocks separated by blank lines, stripped, empty ones dropped."""
    text = Path(path).read_text(encoding="utf-8")
    return [e.strip() for e in text.replace("\r\n", "\n").split("\n\n") if e.strip()]


def pack(tokenizer, entries: list[str]) -> list[int]:
    """One token stream: for each entry <|bos|> tokens <|eos|> (the tokenizer adds the bos)."""
    ids: list[int] = []
    for tokens in tokenizer(list(entries))["input_ids"] if entries else []:
        ids += tokens + [tokenizer.eos_token_id]
    return ids


@torch.no_grad()
def perplexity(model: torch.nn.Module, token_ids: list[int] | torch.Tensor, seq_len: int = 256,
               batch_size: int = 16, device: torch.device | str | None = None) -> tuple[float, int]:
    """Token-level perplexity of a packed stream, computed in fp32 on `device` (model's by default).

    The stream is cut into windows of seq_len + 1 tokens overlapping by one, each window
    evaluated from position 0, so every token but the first is predicted exactly once.
    Returns (exp(mean NLL), number of predicted tokens). The model is cast to fp32 (and
    moved to `device`) for the evaluation, and back afterwards.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    param = next(model.parameters())
    dtype, home = param.dtype, param.device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.to(device=device, dtype=torch.float32).eval()
    windows = [ids[i: i + seq_len + 1] for i in range(0, ids.numel() - 1, seq_len)]
    full = [w for w in windows if w.numel() == seq_len + 1]
    groups = [torch.stack(full[b: b + batch_size]) for b in range(0, len(full), batch_size)]
    groups += [w[None] for w in windows if w.numel() != seq_len + 1]  # the short last one
    nll, count = 0.0, 0
    for group in groups:  # [G, L]
        group = group.to(device)
        x, y = group[:, :-1], group[:, 1:]
        positions = torch.arange(x.shape[1], device=device).expand_as(x)
        with torch.autocast(device_type=device.type, enabled=False):
            logits = model(x, positions).float()  # [G, L-1, V]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.to(device=home, dtype=dtype).train(was_training)
    return math.exp(nll / count), count


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 20,
                    stop_at_eos: bool = True) -> str:
    """Greedy continuation of `prompt` (decoded new text only): forward the whole growing sequence each step."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)  # [1, S], bos first
    n_prompt = ids.shape[1]
    for _ in range(max_new_tokens):
        positions = torch.arange(ids.shape[1], device=device)[None]
        next_id = model(ids, positions)[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        if stop_at_eos and next_id.item() == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, n_prompt:].tolist(), skip_special_tokens=True)
