"""N-gram (prompt lookup) proposer: the draft is what followed the latest earlier
occurrence of the sequence's last n tokens in its own prompt and output, for the largest
n <= max_matching_ngram_size that occurs (TensorRT-LLM's NGramDecodingConfig; vLLM's
"[ngram]"). No model, no state: a pure function of the token ids.

    propose_ngram([1, 2, 3, 9, 1, 2], max_draft_len=3, max_ngram=2) -> [3, 9, 1]

When the continuation reaches the end of the sequence before max_draft_len tokens, it goes
on copying from its own start (an overlapping copy, as LZ77 does): text that repeats with
period p is extended by its period, [7, 8, 7, 8, 7] -> [8, 7, 8, 7]. So a match always gives
max_draft_len drafts, and every verify step of such a sequence has the shape the verify CUDA
graphs were captured for (max_draft_len + 1 tokens; a shorter one runs without a graph: a
step of 24.7 ms instead of 10.8 ms for an 8B target at batch 1 on the H200). A wrong draft
costs nothing there: the graph computes max_draft_len + 1 rows either way.
"""
from __future__ import annotations

import numpy as np


def propose_ngram(tokens: list[int], max_draft_len: int, max_ngram: int) -> list[int]:
    """max_draft_len tokens; [] when no suffix of 1..max_ngram tokens occurred before.

    One comparison over the sequence finds where its last token occurred before (the ends
    of the 1-gram matches); an n-gram match is an (n-1)-gram match whose window extends one
    token further back, so each longer n only filters the few ends left (not a window
    view of the whole sequence per n: on the dev CPU, 192 tokens, n <= 3, 18 -> 10 us a
    call when the text repeats, 40 -> 4 us when nothing matches)."""
    L = len(tokens)
    if L < 2 or max_draft_len <= 0:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    ends = np.flatnonzero(arr[:L - 1] == arr[L - 1])  # windows end at or before L - 2: the suffix excluded
    if not ends.size:
        return []
    for n in range(2, min(max_ngram, L - 1) + 1):
        longer = ends[ends >= n - 1]
        longer = longer[arr[longer - (n - 1)] == arr[L - n]]
        if not longer.size:
            break
        ends = longer
    start = int(ends[-1]) + 1  # the latest occurrence of the longest match: the freshest continuation
    out: list[int] = []
    for i in range(max_draft_len):  # past the end: a copy of its own output (overlapping)
        j = start + i
        out.append(tokens[j] if j < L else out[j - L])
    return out
