"""Programmatic dependent launch (PDL): a kernel's launch and prologue overlap the tail
of the kernel before it on the stream (Hopper and later; CUDA graphs keep the edge).

A kernel launched with `launch_pdl=True` may start once every program of the previous
kernel has called `gdc_launch_dependents()` or exited, so *before* that kernel's writes
are visible. Its programs must call `gdc_wait()` (which returns once the previous kernel
has completed and its memory is flushed) before touching anything that kernel writes,
and before writing anything that kernel may still read. Before the wait, a PDL kernel
may read only what no kernel still running writes: in this project, the attention
metadata (copied from the host before the step) and the KV cache's context.

Who uses it: the decode attention kernel is launched with PDL (paged_attention_decode.py
says what it does before its wait); the rotary kernel, which runs right before it in a
decode step, triggers its dependents at its start (rotary.py).

The switches: `TRTLLM_PDL=0` in the environment turns it off for the process (read at
import); the modules' flags (paged_attention_decode._USE_PDL, rotary._PDL_TRIGGER, read
at each launch, so at CUDA-graph capture) and launch_decode's `pdl` keyword turn it off
or on at run time. It is never on where it cannot work: off CUDA, under the Triton
interpreter (which has no inline asm), before sm_90.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import triton_interpreter_on

DEFAULT = os.environ.get("TRTLLM_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def use_pdl(device: torch.device, wanted: bool) -> bool:
    """Whether a launch on `device` may use PDL, given the caller's wish."""
    if not wanted or device.type != "cuda" or triton_interpreter_on():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) >= 9


@triton.jit
def gdc_wait():
    """Block until the previous kernel completed and its writes are visible (a no-op
    when this launch did not use PDL)."""
    tl.extra.cuda.gdc_wait()


@triton.jit
def gdc_launch_dependents():
    """Let the next kernel, if PDL-launched, start once every program got here or exited."""
    tl.extra.cuda.gdc_launch_dependents()
