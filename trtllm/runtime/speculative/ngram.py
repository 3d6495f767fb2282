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
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: list[int], max_draft_len: int, max_ngram: int) -> list[int]:
    """max_draft_len tokens; [] when no suffix of 1..max_ngram tokens occurred before."""
    L = len(tokens)
    if L < 2 or max_draft_len <= 0:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, L - 1), 0, -1):
        # windows starting at 0 .. L-n-1: every earlier occurrence (the suffix itself excluded)
        windows = sliding_window_view(arr[:L - 1], n)
        hits = np.flatnonzero((windows == arr[L - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: the freshest continuation
            extended = list(tokens)
            for i in range(max_draft_len):  # start + i < len(extended): a copy that may overlap its output
                extended.append(extended[start + i])
            return extended[L:]
    return []
