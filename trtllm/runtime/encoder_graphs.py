"""`EncoderGraphs`: CUDA graphs of a vision tower at small batches of images.

    tower = EncoderGraphs(compile_encoder(model.vision_tower), (3, 336, 336), args=(layers,), device=dev)
    hidden = tower(pixels, layers)   # [N, 3, 336, 336] -> the tower's outputs, each [N, ...]

A request's image is encoded at batch 1 on its TTFT path, where launching the tower's ~300 kernels
costs more host time than they run (LLaVA-1.5: CLIP ViT-L/14-336, 577 tokens a crop; issue 26's
TTFT floor). A tower whose input is a fixed-shape batch of crops (LLaVA-1.5 / NeXT's CLIP, not
Qwen2.5-VL's patch lists) is captured once per size in `batches` (1, 2, 4, 8): a call with
N <= 8 crops copies them into the static input of the next captured size, replays, and returns
copies of the first N rows of each output (the features outlive the next replay in the encoder
cache). A crop's features depend on its own pixels only (no attention across the batch), so the
padding rows change nothing; they repeat the last crop (finite values). Other calls (more crops,
other arguments) run the tower as it is.
"""
from __future__ import annotations

import bisect

import torch

BATCHES = (1, 2, 4, 8)


class EncoderGraphs:
    def __init__(self, tower, crop_shape: tuple[int, ...], *, args: tuple, device, dtype,
                 batches: tuple[int, ...] = BATCHES):
        self.tower, self.args, self.batches = tower, args, sorted(batches)
        self._inputs = torch.zeros((self.batches[-1], *crop_shape), device=device, dtype=dtype)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.num_replays = 0  # calls served by a graph (what the tests read)
        pool = None
        for b in reversed(self.batches):  # the largest first: the smaller ones fit in its pool
            x = self._inputs[:b]
            for _ in range(2):  # compiled for this shape and warmed up outside the graph
                tower(x, *args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = tower(x, *args)
            pool = graph.pool()
            self._graphs[b] = (graph, tuple(outputs))

    def __call__(self, pixels: torch.Tensor, *args):
        n = pixels.shape[0]
        i = bisect.bisect_left(self.batches, n)
        if i == len(self.batches) or args != self.args or pixels.dtype != self._inputs.dtype \
                or pixels.shape[1:] != self._inputs.shape[1:]:
            return self.tower(pixels, *args)
        b = self.batches[i]
        self._inputs[:n].copy_(pixels)
        if b > n:
            self._inputs[n:b].copy_(pixels[-1:].expand(b - n, *pixels.shape[1:]))
        graph, outputs = self._graphs[b]
        graph.replay()
        self.num_replays += 1
        return tuple(o[:n].clone() for o in outputs)
