"""The one place that knows how a kernel becomes a torch op.

Each op file defines a Triton launcher and a plain-torch reference with the same
signature (type-annotated: `torch.library` infers the schema from it), and calls
`register_op`. The registered op `torch.ops.trtllm.<name>`:

- on a CUDA tensor runs the Triton launcher;
- on a CPU tensor runs the reference, unless the Triton interpreter is on
  (`TRITON_INTERPRET=1`, set by the test suite) in which case the launcher runs,
  so every kernel is exercised on CPU;
- carries a fake (meta) implementation so torch.compile graphs can hold it.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Callable, Iterable

import torch


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel (not the reference) should run for tensor `t`."""
    return t.is_cuda or (t.device.type == "cpu" and triton_interpreter_on())


def register_op(
    name: str,
    *,
    launcher: Callable | None = None,
    reference: Callable | None = None,
    fake: Callable,
    mutates_args: Iterable[str] = (),
    impl: Callable | None = None,
):
    """Register `torch.ops.trtllm.<name>`, dispatching between `launcher` and `reference`.

    The first tensor argument decides the device. An op made of other ops, which
    dispatch themselves (the graph's `trtllm.attention`), passes `impl` alone instead.
    Returns the op (a callable).
    """
    if impl is None:
        impl = _dispatch(launcher, reference)
    # torch.library reads the schema off the signature; resolve string annotations (from
    # `from __future__ import annotations`) in the op file's namespace, not this one's.
    impl.__signature__ = inspect.signature(launcher or impl, eval_str=True)

    op = torch.library.custom_op(f"trtllm::{name}", impl, mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    return op


def _dispatch(launcher: Callable, reference: Callable) -> Callable:
    @functools.wraps(launcher)
    def impl(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        return (launcher if use_triton(first) else reference)(*args, **kwargs)

    return impl


def _fix_interpreter_index() -> None:
    """Let the Triton interpreter run `range(start, stop)` with runtime bounds.

    The interpreter holds scalars as 1-element numpy arrays and its `tensor.__index__` is
    `int(array)`, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"). Wrap the interpreter's tensor patching to index element 0.
    """
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_index_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._index_fixed = True
    interpreter._patch_lang_tensor = patched


if triton_interpreter_on():  # every kernel with a data-dependent loop needs it
    _fix_interpreter_index()
