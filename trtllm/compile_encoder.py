"""`trtllm.compile_encoder(module)`: a vision encoder (a ViT as a plain module) compiled.

    tower = compile_encoder(model.vision_tower)
    hidden = tower(pixel_values, layers)          # as the module's own forward

The pipeline of compile.py for a model with no KV cache: dynamo captures the whole forward
(fullgraph), ENCODER_PASSES rewrite it (its bidirectional SDPA -> trtllm.bidirectional_attention,
a fused Triton kernel), then Inductor (CUDA) or the rewritten graph (CPU). The batch dim of the
first tensor argument (images or crops) is dynamic from the first call. `summary()` names the
rewrites. A causal decoder goes through `trtllm.compile`, which refuses bidirectional attention.
"""
from __future__ import annotations

import collections
import copy
import functools

import torch
import torch.fx as fx
import torch.nn as nn

from trtllm.attention_context import PagedKVCache  # noqa: F401  (the kernels' registrations, as compile.py)
from trtllm.compile import _DYNAMO_CONFIG, static_fakes
from trtllm.contract import CompileError
from trtllm.inductor_fallbacks import declare_inductor_fallbacks
from trtllm.passes import ENCODER_PASSES
from trtllm.passes.context import AttentionLayers, GraphInputs, PassContext

__all__ = ["compile_encoder", "CompiledEncoder"]


class CompiledEncoder:
    def __init__(self, module: nn.Module, *, inductor: bool | None = None, passes=None, max_autotune: bool = False):
        self.module = module
        # Inductor's max_autotune: its Triton GEMM templates (with the bias, activation and
        # residual add fused into their epilogues) raced against cuBLAS per shape; minutes of
        # compilation (bench/probes/encoder_kernels.py measures what it buys)
        self.config_patches = {"max_autotune": True} if max_autotune else None
        device = next(module.parameters()).device
        self.inductor = device.type == "cuda" if inductor is None else inductor
        self.passes = list(ENCODER_PASSES if passes is None else passes)
        self.matches: collections.Counter[str] = collections.Counter()
        self.graphs: list[fx.GraphModule] = []
        self._compiled = torch.compile(module, backend=self._backend, dynamic=None, fullgraph=True)

    def _backend(self, dynamo_gm: fx.GraphModule, example_inputs: list):
        gm = fx.GraphModule(dynamo_gm, copy.deepcopy(dynamo_gm.graph))
        inputs = GraphInputs(gm.graph, example_inputs)
        ctx = PassContext(inputs=inputs, attention=AttentionLayers())
        for p in self.passes:
            self.matches[p.__name__] += p(gm.graph, ctx)
        gm.graph.lint()
        gm.recompile()
        self.graphs.append(gm)
        constants = list(inputs.constants)
        if not self.inductor:
            return functools.partial(_call, gm.forward, constants)
        from torch._inductor.compile_fx import compile_fx
        declare_inductor_fallbacks(gm.graph)
        return functools.partial(_call, compile_fx(gm, list(example_inputs) + static_fakes(constants, example_inputs),
                                                   config_patches=self.config_patches), constants)

    def __call__(self, *args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.shape[0] >= 2:
            torch._dynamo.maybe_mark_dynamic(first, 0)
        # compile.py's dynamo settings: every tower of one class shares its forward's dynamo cache
        # (a process that builds many LLMs recompiles per instance), and past the limit raise
        with torch.no_grad(), torch._dynamo.config.patch(**_DYNAMO_CONFIG):
            try:
                return self._compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if isinstance(e.inner_exception, CompileError):
                    raise e.inner_exception from None
                raise

    def summary(self) -> str:
        ops = collections.Counter(str(n.target).removesuffix(".default") for gm in self.graphs for n in gm.graph.nodes
                                  if n.op == "call_function" and str(n.target).startswith("trtllm."))
        lines = [f"trtllm.compile_encoder: {type(self.module).__name__}, {len(self.graphs)} graph(s)", "rewrites:"]
        lines += [f"  {p.__name__}: {self.matches[p.__name__]}" for p in self.passes]
        lines += ["trtllm ops in the final graph(s):"] + [f"  {k}: {v}" for k, v in sorted(ops.items())]
        return "\n".join(lines)


def _call(run, constants, *args):
    return run(*args, *constants)


def compile_encoder(module: nn.Module, **options) -> CompiledEncoder:
    """Compile a vision encoder (see the module docstring). Options: inductor, passes, max_autotune."""
    return CompiledEncoder(module, **options)
