"""The one place that knows how a kernel becomes a torch op.

Each op file defines a Triton launcher and a plain-torch reference with the same
signature (type-annotated: `torch.library` infers the schema from it), and calls
`register_op`. The registered op `torch.ops.trtllm.<name>`:

- on a CUDA tensor runs the Triton launcher;
- on a CPU tensor runs the reference, unless the Triton interpreter is on
  (`TRITON_INTERPRET=1`, set by the test suite) in which case the launcher runs,
  so every kernel is exercised on CPU;
- carries a fake (meta) implementation so torch.compile graphs can hold it.

Launchers wrap their kernel launches in `interpreter_upcast`, so that an interpreted run
computes what the GPU computes in bf16 too.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_num_warps(row_elements: int, elements_per_warp: int, lo: int, hi: int = 16) -> int:
    """Warps for a kernel whose program walks one row: row_elements / elements_per_warp,
    rounded up to a power of two (Triton refuses any other count) and clamped to [lo, hi].
    A plain division gave 14 warps for the 14,336-wide MLP row of Llama-3.1-8B."""
    import triton

    want = max(lo, min(hi, -(-row_elements // elements_per_warp)))
    return min(hi, triton.next_power_of_2(want))


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
    # torch.library reads the schema off the signature: the reference's, the semantics of
    # record (a launcher may take extra keyword-only options, e.g. paged attention's launch
    # choice, that the op does not carry). String annotations (from `from __future__ import
    # annotations`) resolve in the op file's namespace, not this one's.
    impl.__signature__ = inspect.signature(reference or impl, eval_str=True)

    op = torch.library.custom_op(f"trtllm::{name}", impl, mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    return op


def _dispatch(launcher: Callable, reference: Callable) -> Callable:
    @functools.wraps(launcher)
    def impl(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        return (launcher if use_triton(first) else reference)(*args, **kwargs)

    return impl


Tensors = Sequence[torch.Tensor | None]


def interpreter_upcast(reads: Tensors, writes: Tensors = ()) -> contextlib.AbstractContextManager[tuple[tuple, tuple]]:
    """Yields (reads, writes) as a kernel launch should get them: unchanged, except while
    the Triton interpreter runs, when every bf16 (or fp8 e4m3) tensor is replaced by an fp32 copy and,
    on leaving the block, each fp32 copy in `writes` is rounded back into its original.

    The interpreter (triton 3.6-3.9) holds bf16 values as their raw uint16 bits: its
    tl.dot multiplies the bit patterns (the bf16 demo model wrote replacement
    characters), and its fp32 -> bf16 casts truncate where the GPU rounds to nearest (a
    bias that flipped the demo model's greedy tokens). In fp32 the kernels' dot products
    are the GPU's (a bf16 x bf16 product is exact in fp32) and a result is rounded to
    bf16 once, by torch, to nearest. What differs from the GPU: roundings to bf16 inside
    a kernel (attention's P before P @ V, rms_norm's inner two) do not happen, an ulp
    or two at most.

    `writes` are what the kernel stores to, outputs and caches alike: the entries it did
    not touch go back unchanged (bf16 -> fp32 -> bf16 is exact), so a whole KV cache
    round-trips with only the kernel's writes changed. A tensor object passed twice (an
    unused operand standing in for another) gets one copy. fp16 and fp32 tensors pass as
    they are: the interpreter computes those in numpy's own types.
    """
    # The compiled path: 1.8 us a launch on a CI CPU (timeit; the generator 4.1 us), where a
    # Triton launch takes ~120 us of host time (kernels/linear.py).
    if not triton_interpreter_on():
        return contextlib.nullcontext((tuple(reads), tuple(writes)))
    return _fp32_copies(reads, writes)


# bf16 (see interpreter_upcast) and fp8 e4m3: the interpreter's fp32 -> fp8 casts do not
# round to nearest (randn * 10 stored as fp8 came back up to 4 away from torch's cast); loaded as fp32, the
# GEMMs' fp8 x fp8 products are exact as on the GPU, and a written fp32 copy is rounded
# to fp8 by torch (kernels/quantize_fp8.py clamps to +-448 first: torch gives NaN past it).
_UPCAST_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)


@contextlib.contextmanager
def _fp32_copies(reads: Tensors, writes: Tensors) -> Iterator[tuple[tuple, tuple]]:
    copies: dict[int, torch.Tensor] = {}

    def upcast(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.dtype not in _UPCAST_DTYPES:
            return t
        if id(t) not in copies:
            copies[id(t)] = t.float()
        return copies[id(t)]

    reads_up, writes_up = tuple(map(upcast, reads)), tuple(map(upcast, writes))
    yield reads_up, writes_up
    written = {id(t): t for t in writes if t is not None and id(t) in copies}
    for key, t in written.items():
        t.copy_(copies[key])


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
