"""What a sampled row may not take, or is pushed toward, this step: built on the host from each
sequence's tokens and SamplingParams, handed to the device as flat indices into the step's
[N, V] logits (sampler.SamplingBatch) or as [N, V] rows."""
from __future__ import annotations

from itertools import chain

import torch
from torch import Tensor

from trtllm.runtime.sequence import Sequence


def to_device(t: Tensor, device) -> Tensor:
    """A host tensor built this step, on `device` without blocking the host: `.to(device)`
    synchronizes the stream (so it waited for the step's model graph, and the sampler could not
    be queued behind it: gaps of 0.17-0.26 ms after a prefill graph, H100 profile 2026-12-06);
    a non-blocking copy needs pinned memory to stay asynchronous."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def bias_rows(seqs: list[Sequence], V: int, device) -> Tensor | None:
    """[N, V] of the rows' embedding biases (copied to the device each step: a rare option), or None."""
    biases = [s.sampling_params.embedding_bias for s in seqs]
    if all(b is None for b in biases):
        return None
    zero = torch.zeros(V, dtype=torch.float32)
    return to_device(torch.stack([zero if b is None else b.detach().float().cpu() for b in biases]), device)


def banned(seq: Sequence, bans: tuple) -> tuple:
    """The ids `seq` may not take next: each ban's last token where prompt + output end with
    the rest of it (a one-token ban always)."""
    out, prompt = seq.output_token_ids, seq.prompt_token_ids
    ids = []
    for ban in bans:
        k = len(ban) - 1
        if k == 0:
            ids.append(ban[0])
            continue
        tail = out[-k:] if len(out) >= k else prompt[len(prompt) - (k - len(out)):] + out
        if len(tail) == k and tuple(tail) == ban[:-1]:
            ids.append(ban[-1])
    return tuple(ids)


def repeats(seq: Sequence, n: int) -> tuple:
    """HF's no_repeat_ngram_size: the tokens that would make an n-gram of prompt + output occur
    twice (each token after an earlier occurrence of the last n - 1)."""
    tokens = seq.prompt_token_ids + seq.output_token_ids
    if len(tokens) < n:
        return ()
    if n == 1:
        return tuple(set(tokens))
    last = tokens[len(tokens) - n + 1:]
    return tuple({tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == last})


def flat_index(id_lists: list, V: int, device) -> Tensor | None:
    """Row r's ids as flat indices r * V + id into an [N, V] tensor, built without a
    Python loop over tokens (chain and repeat_interleave do the work)."""
    lengths = [len(ids) for ids in id_lists]
    total = sum(lengths)
    if total == 0:
        return None
    ids = to_device(torch.tensor(list(chain.from_iterable(id_lists)), dtype=torch.int64), device)
    rows = torch.repeat_interleave(torch.arange(len(id_lists), device=device),
                                   to_device(torch.tensor(lengths), device), output_size=total)
    return rows * V + ids
