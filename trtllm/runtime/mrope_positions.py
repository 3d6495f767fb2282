"""M-RoPE positions (Qwen2.5-VL): three position rows (temporal, height, width) per token,
computed on the host per sequence, and staged per step into the buffer the compiled model reads.

A model whose config says `position_axes == 3` takes `positions` [3, 1, T] instead of [1, T]
(the flat ragged batch); every other model keeps its 1-D positions and never meets this file.

Per sequence (HF's `get_rope_index`, for images): text tokens count on from the last position
with all three rows equal; an image of t x h x w merged tokens starting at position p puts its
token (i, j, k) at (p + i, p + j, p + k), and the text after it starts at p + max(h, w) (t
for images is 1). Past the prompt (decode, and any position beyond the table) a token at
index n is at n + delta on every row, delta = (the prompt's largest position + 1) - prompt
length (HF's `rope_deltas`): so a text-only sequence has positions (n, n, n).
The table is computed once per request (its `MultimodalData.mrope`) and shared by its n
sequences.

`MropeStager.stage(chunks, size)` writes the positions of a step's chunks (sequence, first
index, count), in flat-batch order, into pinned staging and copies them into one device
buffer [max_num_tokens, 3]; `positions(n)` is its [3, 1, n] view (the same strides for every
n, so one compiled graph and the captured CUDA graphs read it in place).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MropeTable:
    """One prompt's positions [3, L] (int64, host) and the decode offset delta."""
    positions: np.ndarray
    delta: int


def rope_index(prompt_len: int, images: list, spatial_merge_size: int) -> MropeTable:
    """M-RoPE positions of a prompt of `prompt_len` tokens whose images (ImageSpan: offset,
    length, grid_thw (t, h, w) in patches) hold the placeholder runs."""
    m = spatial_merge_size
    rows = np.zeros((3, prompt_len), dtype=np.int64)
    cursor, pos = 0, 0
    for im in sorted(images, key=lambda im: im.offset):
        t, h, w = im.grid_thw
        gh, gw = h // m, w // m
        if t * gh * gw != im.length:
            raise ValueError(f"an image of grid {t}x{h}x{w} is {t * gh * gw} tokens, but its placeholder run is "
                             f"{im.length}")
        n = im.offset - cursor  # text before the image
        rows[:, cursor:im.offset] = np.arange(pos, pos + n)
        pos += n
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        rows[:, im.offset:im.offset + im.length] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos
        pos += max(gh, gw)
        cursor = im.offset + im.length
    rows[:, cursor:] = np.arange(pos, pos + prompt_len - cursor)
    delta = int(rows.max()) + 1 - prompt_len if prompt_len else 0
    return MropeTable(rows, delta)


class MropeStager:
    def __init__(self, max_num_tokens: int, spatial_merge_size: int, device):
        device = torch.device(device)
        self.spatial_merge_size = spatial_merge_size
        self.buffer = torch.zeros((max_num_tokens, 3), dtype=torch.long, device=device)
        self._host = torch.zeros((max_num_tokens, 3), dtype=torch.long, pin_memory=device.type == "cuda")
        self._host_np = self._host.numpy()

    def positions(self, n: int) -> torch.Tensor:
        """The step's positions [3, 1, n] (a view of the buffer)."""
        return self.buffer[:n].t()[:, None]

    def table(self, seq) -> MropeTable | None:
        """The sequence's prompt table (computed at its first step), None for a text-only one."""
        mm = seq.multimodal
        if mm is None or not mm.images:
            return None
        if mm.mrope is None:
            mm.mrope = rope_index(len(seq.prompt_token_ids), mm.images, self.spatial_merge_size)
        return mm.mrope

    def stage(self, chunks, size: int) -> None:
        """chunks: (sequence, first token index, count) in flat-batch order; rows past their
        total up to `size` (a graph's padding) are zeros. The copy is queued on the current
        stream, before the step that reads it (the runner rewrites the staging only after its
        previous copies ran)."""
        host, t = self._host_np, 0
        for seq, start, n in chunks:
            table = self.table(seq)
            end = start + n
            if table is None:
                host[t:t + n] = np.arange(start, end)[:, None]
            else:
                known = min(end, table.positions.shape[1])
                k = max(0, known - start)
                if k:
                    host[t:t + k] = table.positions[:, start:known].T
                if k < n:  # past the prompt: index + delta on every row
                    host[t + k:t + n] = np.arange(start + k, end)[:, None] + table.delta
            t += n
        host[t:size] = 0
        size = max(size, t)
        self.buffer[:size].copy_(self._host[:size], non_blocking=True)


def widen_positions(positions: torch.Tensor) -> torch.Tensor:
    """1-D positions [1, T] -> [3, 1, T] laid out as `MropeStager.positions` (the same strides,
    so a call made with them, e.g. the KV profiling call, compiles the graph the runtime uses)."""
    return positions[0][:, None].expand(-1, 3).contiguous().t()[:, None]


def mrope_stager(module, max_num_tokens: int, device) -> MropeStager | None:
    """The stager of a model with 3-axis positions (config.position_axes == 3), else None."""
    config = getattr(module, "config", None)
    if getattr(config, "position_axes", 1) != 3:
        return None
    vision = getattr(config, "vision", None)
    return MropeStager(max_num_tokens, getattr(vision, "spatial_merge_size", 1), device)
