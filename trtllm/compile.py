"""`trtllm.compile(model) -> CompiledModel`: a causal LM as a paged, batched model.

    compiled = trtllm.compile(model)            # our models, HF *ForCausalLM, or any
    logits = compiled(input_ids, positions)     # nn.Module following the contract

torch.compile captures the model with dynamo; our backend runs the pass list
(trtllm/passes) over the graph, then hands it to Inductor (default on CUDA) or runs it
as is (default on CPU, where Inductor's C++ build costs more than it saves in tests).

Called outside an attention context, `compiled(input_ids [B, S], positions)` treats
the batch as B whole sequences on a scratch cache and returns the eager model's
logits. The runtime instead calls it with its flat batch `[1, T]` inside
`attention_context(cache, metadata)` (runtime/attention_context.py).

`DECODE_GRAPH_PASSES` (today `use_gemv_linear`: linears as a Triton GEMV) serve only small
decode CUDA graphs: inside `with compiled.decode_graphs():` (the runner's capture) a call
of at most kernels/linear.py:GEMV_MAX_M tokens runs a second compilation, with them after
the pass list; every other call runs the pass list alone. Measured on the H100 (bench/probes/gemv_ab.py): the
pass made the batch-1 decode graph 6.31 -> 5.70 ms, but the batch-64 and -256 graphs
6.65 -> 7.12 and 8.02 -> 8.66 ms (the linears it does not turn into a GEMV go through
the custom op to F.linear, slower than Inductor's own mm there).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from trtllm.kernels import linear as linear_kernels
from trtllm.kernels.linear import unsupported as unsupported_linear
from trtllm.passes import DECODE_GRAPH_PASSES, PASSES
from trtllm.passes.context import AttentionLayers, CompileError, GraphInputs, PassContext
from trtllm.passes.fuse_parallel_linears import share_fused_storage
from trtllm.passes.replace_sdpa_with_paged_attention import unpageable
from trtllm.passes.use_gemv_linear import use_gemv_linear
from trtllm.runtime.attention_context import AttentionMetadata, PagedKVCache, attention_context
import trtllm.runtime.attention_context as attention_context_module

__all__ = ["compile", "CompiledModel", "CompileError", "AttentionSpec"]


@dataclass(frozen=True)
class AttentionSpec:
    """What the KV cache must hold, per model: found by running the model once."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


class _RecordSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.keys: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.keys.append(args[1] if len(args) > 1 else kwargs["key"])
            self._check(*args, **kwargs)
        return func(*args, **kwargs)

    def _check(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
        reason = unpageable(attn_mask is not None, dropout_p, is_causal, query.shape[-2])
        if reason is not None:  # refused at compile() time, before any tracing
            raise CompileError(f"attention layer {len(self.keys) - 1}: {reason}")


def probe_attention(forward: nn.Module, device: torch.device) -> AttentionSpec:
    """Run `forward` eagerly on two tokens and record every SDPA's key shape."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    with torch.no_grad(), _RecordSDPA() as rec:
        forward(ids, torch.arange(2, device=device)[None])
    if not rec.keys:
        raise CompileError("the model calls no F.scaled_dot_product_attention: nothing to page")
    shapes = {(k.shape[1], k.shape[3], k.dtype) for k in rec.keys}
    if len(shapes) != 1:
        raise CompileError(f"attention layers differ in kv heads/head dim/dtype: {sorted(map(str, shapes))}")
    (heads, dim, dtype), = shapes
    return AttentionSpec(len(rec.keys), heads, dim, dtype)


def _contract_module(model: nn.Module) -> nn.Module:
    from transformers import PreTrainedModel
    if isinstance(model, PreTrainedModel):
        from trtllm.models.hf import HFCausalLM
        return HFCausalLM(model)
    return model


def _windows(model: nn.Module, num_layers: int) -> list[int]:
    config = getattr(model, "config", None)
    if config is None:
        return [0] * num_layers
    if hasattr(config, "layer_windows"):
        return list(config.layer_windows)
    if not hasattr(config, "to_dict"):
        return [0] * num_layers
    from trtllm.models.llama import layer_windows_from_hf
    return layer_windows_from_hf(config.to_dict(), config.model_type, config.num_hidden_layers)


_DYNAMO_CONFIG = dict(
    # float attributes (eps, scale) stay constants the passes can read, not graph inputs
    specialize_float=True,
    # every model instance of one class shares its forward's dynamo cache; past the
    # limit dynamo would fall back to eager (silently wrong on a flat batch): raise
    recompile_limit=256,
    accumulated_recompile_limit=4096,
    fail_on_recompile_limit_hit=True,
)


class CompiledModel:
    """A model compiled for the paged runtime. `summary()` tells what the passes did."""

    def __init__(self, model: nn.Module, *, inductor: bool | None = None, passes=None,
                 decode_graph_passes=None, block_size: int = 16):
        self.module = _contract_module(model)
        self.device = next(self.module.parameters()).device
        self.inductor = self.device.type == "cuda" if inductor is None else inductor
        self.passes = list(PASSES if passes is None else passes)
        self.decode_graph_passes = list(DECODE_GRAPH_PASSES if decode_graph_passes is None else decode_graph_passes)
        self.block_size = block_size
        self.attention = probe_attention(self.module, self.device)
        self._layers = AttentionLayers(windows=_windows(self.module, self.attention.num_layers))
        self.matches: collections.Counter[str] = collections.Counter()
        self.graphs: list[fx.GraphModule] = []
        self._to_share: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self._logits_indices: torch.Tensor | None = None
        self.lm_head_op: str | None = None  # how the split-off LM head is applied, if split
        # fullgraph: an SDPA left outside our graphs would run eagerly across the
        # sequences of a flat batch, silently wrong; a graph break must be an error.
        # Two compilations (dynamo keeps one cache per backend): see the module docstring.
        self._compiled = self._torch_compile(self.passes)
        self._compiled_gemv = None
        if self.decode_graph_passes:
            self._compiled_gemv = self._torch_compile(self.passes + self.decode_graph_passes)
        self._in_decode_graphs = False

    def _torch_compile(self, passes: list):
        return torch.compile(self.module, backend=functools.partial(self._backend, passes=passes),
                             dynamic=None, fullgraph=True)

    # -- the dynamo backend ----------------------------------------------------------
    @contextlib.contextmanager
    def decode_graphs(self):
        """Calls inside are the runner's decode CUDA graphs (warm-up and capture): those of
        at most GEMV_MAX_M tokens run the compilation with DECODE_GRAPH_PASSES."""
        self._in_decode_graphs = True
        try:
            yield
        finally:
            self._in_decode_graphs = False

    def _backend(self, dynamo_gm: fx.GraphModule, example_inputs: list, passes: list):
        # A fresh GraphModule: dynamo inspects its own graph after we return, and a
        # graph without dynamo's metadata lets our added constant inputs through aot.
        gm = fx.GraphModule(dynamo_gm, copy.deepcopy(dynamo_gm.graph))
        inputs = GraphInputs(gm.graph, example_inputs)
        ctx = PassContext(inputs=inputs, attention=self._layers)
        for p in passes:
            self.matches[p.__name__] += p(gm.graph, ctx)
        gm.graph.lint()
        gm.recompile()
        self.graphs.append(gm)
        constants = list(inputs.constants)
        self._to_share += inputs.fused_params
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx
            run = compile_fx(gm, list(example_inputs) + constants)
        else:
            run = gm.forward
        head = ctx.lm_head
        head_linear = F.linear
        if head is not None:
            # The largest GEMV of a decode step: trtllm.linear too (a GEMV up to its row
            # limit, cuBLAS above) when the linears of the graph get it and the weight suits.
            if use_gemv_linear in passes and unsupported_linear(head[0].dtype, *head) is None:
                head_linear = torch.ops.trtllm.linear
            if self.lm_head_op is None or head_linear is not F.linear:
                self.lm_head_op = "trtllm.linear in decode graphs" if head_linear is not F.linear else "F.linear"

        def forward(*args):
            (out,) = run(*args, *constants)  # hidden [B, S, H] if the head was split, else logits
            rows = self._logits_indices
            if rows is not None:
                out = out.flatten(0, 1).index_select(0, rows)  # [N, H or V]
            if head is not None:
                out = head_linear(out, *head) if out.dtype == head[0].dtype else F.linear(out, *head)
            return (out,)

        return forward

    # -- calling -----------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V]; or [N, V] for the flat token indices `logits_indices`
        (into the B*S tokens), the only rows the LM head is then computed for."""
        self._logits_indices = logits_indices
        if attention_context_module._active is not None:
            return self._run(input_ids, positions)
        return self._whole_sequences(input_ids, positions)

    def _run(self, input_ids, positions):
        compiled = self._compiled
        if self._in_decode_graphs and self._compiled_gemv is not None \
                and input_ids.shape[-1] <= linear_kernels.GEMV_MAX_M:
            compiled = self._compiled_gemv
        with torch.no_grad(), torch._dynamo.config.patch(**_DYNAMO_CONFIG):
            try:
                out = compiled(input_ids, positions)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if isinstance(e.inner_exception, CompileError):
                    raise e.inner_exception from None  # the pass's own message, not dynamo's
                raise
        while self._to_share:  # after the first compile: drop the duplicate weight copies
            share_fused_storage(*self._to_share.pop())
        return out

    def _whole_sequences(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """B independent sequences of S tokens each, on a scratch cache."""
        b, s = input_ids.shape
        per_seq = math.ceil(s / self.block_size)
        spec = self.attention
        cache = PagedKVCache.allocate(spec.num_layers, b * per_seq, self.block_size,
                                      spec.num_kv_heads, spec.head_dim, spec.dtype, self.device)
        meta = AttentionMetadata(b * s, b, per_seq, self.device)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
        meta.fill([s] * b, [s] * b, tables, self.block_size)
        with attention_context(cache, meta):
            return self._run(input_ids, positions)

    def summary(self) -> str:
        ops = collections.Counter()
        for gm in self.graphs:
            for n in gm.graph.nodes:
                if n.op == "call_function" and str(n.target).startswith("trtllm."):
                    ops[str(n.target).removesuffix(".default")] += 1
        lines = [f"trtllm.compile: {len(self.graphs)} graph(s), {self.attention.num_layers} "
                 f"attention layers ({self.attention.num_kv_heads} kv heads x {self.attention.head_dim})",
                 "rewrites:"]
        lines += [f"  {p.__name__}: {self.matches[p.__name__]}" for p in self.passes + self.decode_graph_passes]
        lines.append("trtllm ops in the final graph(s):")
        lines += [f"  {name}: {count}" for name, count in sorted(ops.items())] or ["  (none)"]
        if self.lm_head_op is not None:
            lines.append(f"lm head (outside the graph, on the chosen rows): {self.lm_head_op}")
        return "\n".join(lines)


def compile(model: nn.Module, **options) -> CompiledModel:
    """Compile a causal LM (see module docstring). Options: inductor, passes,
    decode_graph_passes, block_size."""
    return CompiledModel(model, **options)
