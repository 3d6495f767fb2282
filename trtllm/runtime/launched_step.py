"""`LaunchedStep`: one engine step's GPU work, queued and not yet waited for.

`ModelRunner.execute` (and `execute_ahead`, `CudaGraphs.replay`) return one; the engine
reads its results after `wait()` (runtime/model_runner.py's docstring: the overlap scheduler).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trtllm.runtime.prompt_logprobs import PromptSpan
from trtllm.runtime.sequence import Sequence


@dataclass
class LaunchedStep:
    """One step's work, queued on the GPU. `logits` and `picks` hold its results once
    `wait()` returns."""
    scheduled: list[tuple[Sequence, int]]
    to_sample: list[Sequence]         # the sequences whose next token this step computes
    logits: torch.Tensor              # [len(to_sample), V]
    picks: torch.Tensor | None        # decode graphs: [2, len(to_sample)] argmax ids, 1/0 finite; host
    device_picks: torch.Tensor | None  # decode graphs: [2, graph size], on the device (feeds execute_ahead)
    done: torch.cuda.Event | None
    prompt_spans: list[PromptSpan] = ()     # prompt-logprob rows, one span a sequence
    prompt_logits: torch.Tensor | None = None  # [sum of span lengths, V], after the sampled rows
    # speculative decoding: logits rows per to_sample sequence (k + 1 for one verifying k
    # draft tokens), `logits` then [sum(num_rows), V]; None: one row each
    num_rows: list[int] | None = None

    @property
    def logits_in_stream_order(self) -> bool:
        """Whether work queued now on the current stream sees this step's logits: its own
        kernels make them. Not so on a pipeline's first stage, whose logits a receive from the
        last stage fills, complete only at `wait()` (`done` is then that receive)."""
        return self.done is None or isinstance(self.done, torch.cuda.Event)

    def wait(self) -> None:
        """Block until the step's GPU work is done, *without* the GIL (an event wait
        releases it; `.tolist()` on a device tensor would hold it for the whole step),
        so other Python threads (the HTTP server) run while the GPU works."""
        if self.done is not None:
            self.done.synchronize()
