"""Programmatic dependent launch (PDL, sm_90+) for the small kernels of a decode step.

A kernel launched with it may be scheduled while the kernel before it in the stream is still
finishing; it waits (`griddepcontrol.wait`) before it reads anything, so it still sees every
earlier kernel's writes, and signals at once that the next such kernel may launch
(`griddepcontrol.launch_dependents`). What this buys is the launch and ramp-up of each kernel,
hidden behind the tail of the one before: a batch-1 decode step is ~400 launches of 1-20 us.

A kernel takes a `PDL: tl.constexpr` and calls `wait_for_previous(PDL)` first; its launcher
passes `**pdl_options(tensor)`: nothing on the CPU, in the interpreter or before sm_90.

`TRTLLM_PDL=0` in the environment turns it off (read at each launch, so before graphs are
captured): a profile of a PDL graph counts each kernel's wait behind the kernel before as its
own time, so per-kernel µs no longer add up to the step (bench/probes/decode_kernels.py).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from trtllm.kernels.registry import triton_interpreter_on


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_options(t: torch.Tensor) -> dict:
    """The launch options for a kernel on t's device: PDL where the GPU has it."""
    if (t.is_cuda and not triton_interpreter_on() and _hopper_or_later(t.device.index or 0)
            and os.environ.get("TRTLLM_PDL", "1") != "0"):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
