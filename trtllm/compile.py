"""`trtllm.compile(model) -> CompiledModel`: a causal LM (trtllm/contract.py) as a paged,
batched model. The pipeline: the contract's probe -> dynamo captures the whole model -> our
backend runs a pass list (trtllm/passes) -> Inductor (default on CUDA) or the rewritten
graph as is (default on CPU, where Inductor's C++ build costs more than it saves in tests).
What passes hand back besides the graph (passes/context.py) is acted on here, whichever
pass handed it back: a new kind of pass needs no edit of this file.

Outside an attention context, `compiled(input_ids [B, S], positions)` runs B whole
sequences on a scratch cache and returns the eager model's logits; the runtime calls it
with its flat batch `[1, T]` inside `attention_context(cache, metadata)`.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.fx.experimental._config as fx_config
import torch.nn as nn

from trtllm.attention_context import in_attention_context, whole_sequences_context
from trtllm.compile_summary import summarize
from trtllm.contract import AttentionSpec, CompileError, contract_module, probe_attention
from trtllm.expert_load import ExpertLoad
from trtllm.hidden_states import HiddenStash
from trtllm.inductor_choice import inductor_work, worth_inductor
from trtllm.inductor_fallbacks import declare_inductor_fallbacks
from trtllm.lora_slots import LoraSlots
from trtllm.parallel.pipeline_parallel import PipelineStage
from trtllm.parallel.tensor_parallel import TensorParallel, is_unloaded, local_kv_heads
from trtllm.passes import DECODE_GRAPH_MAX_TOKENS, DECODE_GRAPH_PASSES, PASSES
from trtllm.passes.context import AttentionLayers, GraphInputs, LMHead, PassContext
from trtllm.quantization.fp8_linears import Fp8Linears, fp8_linears_of

__all__ = ["compile", "CompiledModel", "CompileError", "AttentionSpec"]

_DYNAMO_CONFIG = dict(
    # float attributes (eps, scale) stay constants the passes can read, not graph inputs
    specialize_float=True,
    # every model instance of one class shares its forward's dynamo cache; past the
    # limit dynamo would fall back to eager (silently wrong on a flat batch): raise
    recompile_limit=256,
    accumulated_recompile_limit=4096,
    fail_on_recompile_limit_hit=True,
    # a plain-PyTorch MoE's `tok, j = torch.where(ids == e)` per expert is one graph (fuse_moe
    # replaces the loop); without this, a graph break, which fullgraph makes an error
    capture_dynamic_output_shape_ops=True,
)

_SHAPE_CONFIG = dict(
    # a dynamic token dim also serves a call of 1 token (a batch-1 decode graph): dynamo would
    # otherwise specialize 1 and capture and compile the model once more for it. Shape code
    # that asks whether the dim is 1 still adds that guard: a view of a non-contiguous slice
    # (split_heads_from_fused takes heads from the whole for it) or transformers' rope, whose
    # cat of transposed frequencies does under Inductor: an HF module captures twice.
    backed_size_oblivious=True,
)


@dataclass
class Variant:
    """One compilation: its passes, the calls it serves, the LM head its passes handed back."""
    name: str                          # as summary() names it
    passes: list
    decode_graphs_only: bool = False   # serves only calls inside decode_graphs()
    max_tokens: int | None = None      # serves only calls of at most this many tokens
    lm_head: LMHead | None = None      # applied after the graph, on the rows asked for
    inductor_work: list[str] | None = None  # compute ops the passes left, when Inductor compiled its last graph
    graphs: list[fx.GraphModule] = field(default_factory=list)  # one per dynamo capture
    matches: collections.Counter[str] = field(default_factory=collections.Counter)  # rewrites per pass

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)


class CompiledModel:
    """A model compiled for the paged runtime. `summary()` tells what the passes did."""

    def __init__(self, model: nn.Module, *, inductor: bool | None = None, passes=None,
                 decode_graph_passes=None, block_size: int = 16, quantization: Fp8Linears | None = None,
                 tensor_parallel: TensorParallel | None = None, lora: LoraSlots | None = None,
                 pipeline: PipelineStage | None = None, expert_load: ExpertLoad | None = None,
                 hidden_stash: HiddenStash | None = None):
        # what the passes quantize (quantize_linears): given, or what loading put on the model
        self.quantization = quantization if quantization is not None else fp8_linears_of(model)
        self.module = contract_module(model)
        self.device = next(self.module.parameters()).device
        self.inductor = inductor  # None: where the passes left work for it, on CUDA (inductor_choice.py)
        self.passes = list(PASSES if passes is None else passes)
        self.decode_graph_passes = list(DECODE_GRAPH_PASSES if decode_graph_passes is None else decode_graph_passes)
        self.block_size = block_size
        self.tensor_parallel = tensor_parallel
        self.lora = lora  # LoRA adapters' slots (passes/apply_lora.py), None without
        self.expert_load = expert_load  # MoE blocks' tokens per expert (trtllm/expert_load.py), None: not counted
        self.hidden_stash = hidden_stash  # states kept a row per KV slot (trtllm/hidden_states.py), None: none
        if expert_load is not None:
            expert_load.bind(model)
        self.attention = probed = probe_attention(self.module, self.device)
        if tensor_parallel is not None and probed.alibi_slopes:
            raise CompileError("ALiBi under tensor parallelism: each rank would need its heads' slopes (not built)")
        if tensor_parallel is not None:  # this rank's KV cache holds its own KV heads only
            try:
                heads = local_kv_heads(self.attention.num_kv_heads, tensor_parallel.size)
            except ValueError as e:
                raise CompileError(str(e)) from None
            self.attention = dataclasses.replace(self.attention, num_kv_heads=heads)
        self.pipeline = pipeline
        self.pending = None  # see take_pending
        if pipeline is not None:  # this rank's KV cache holds its stage's layers only
            a, b = pipeline.first_layer, pipeline.end_layer
            if b > self.attention.num_layers:
                raise CompileError(f"pipeline stage {pipeline.stage} holds layers {a}..{b - 1}; the model has "
                                   f"{self.attention.num_layers} attention layers")
            self.attention = dataclasses.replace(self.attention, num_layers=b - a, windows=self.attention.windows[a:b],
                                                 softcaps=self.attention.softcaps[a:b])
        # the whole model's layers, as replace_sdpa_with_paged_attention numbers them (a pipeline
        # stage's are renumbered after: passes/split_pipeline_stage.py)
        self._layers = AttentionLayers(windows=list(probed.windows), softcaps=list(probed.softcaps),
                                       latent=probed.latent, alibi_slopes=probed.alibi_slopes)
        self.graphs: list[fx.GraphModule] = []  # every variant's, as compiled
        self._after_first_call: list[Callable[[], None]] = []
        self._made_constants: dict = {}  # tensors passes made from the weights, shared by the variants' graphs
        self.notes: dict[str, None] = {}  # passes' notes on what they left as captured (ordered set)
        self._in_decode_graphs = False
        self.compile_s = 0.0  # seconds in calls that compiled a graph (capture, passes, Inductor)
        # The graph variants; a call runs the first that serves it. Decode CUDA graphs of
        # few tokens get DECODE_GRAPH_PASSES too (passes/__init__.py says why only they).
        self.variants = [
            Variant("decode graphs", self.passes + self.decode_graph_passes, decode_graphs_only=True,
                    max_tokens=DECODE_GRAPH_MAX_TOKENS),
            Variant("ordinary calls", self.passes),
        ]
        if not self.decode_graph_passes:  # it would be the ordinary compilation again
            del self.variants[0]
        # One dynamo capture serves every variant: the backend compiles each variant's graph
        # from it, and a call runs the one `_serving` names. Dynamo's bytecode tracing is most of
        # a warm start (a 32-layer model: 11.7 of 17.3 s on the dev CPU, scratch profile), and a
        # torch.compile per variant traced the model once per variant.
        # fullgraph: an SDPA left outside our graphs would run eagerly across the
        # sequences of a flat batch, silently wrong; a graph break must be an error.
        self.captures = 0
        self._serving = self.variants[-1]
        self._compiled = torch.compile(self.module, backend=self._backend, dynamic=None, fullgraph=True)

    def set_hidden_stash(self, stash: HiddenStash) -> None:
        """Stash hidden states from the first call on (compile's `hidden_stash`); the graphs
        compiled so far would not, so this must come before any."""
        if self.graphs:
            raise RuntimeError("set_hidden_stash after the model compiled graphs: they would not stash")
        self.hidden_stash = stash

    @contextlib.contextmanager
    def decode_graphs(self):
        """Calls inside are the runner's decode CUDA graphs (warm-up and capture)."""
        self._in_decode_graphs = True
        try:
            yield
        finally:
            self._in_decode_graphs = False

    def _backend(self, dynamo_gm: fx.GraphModule, example_inputs: list):
        self.captures += 1
        # A capture with a dynamic dim compiles every variant here, inside dynamo's compilation,
        # which keeps the guards Inductor adds on the symbols. One of static shapes (a token
        # count of 1 the dynamic capture could not serve: _SHAPE_CONFIG) has no symbol to guard:
        # it compiles the variant it serves, and another at that one's first call.
        dynamic = any(isinstance(e, torch.SymInt) for e in example_inputs)
        runs = {id(v): self._compile_variant(dynamo_gm, example_inputs, v)  # the ordinary calls' first
                for v in reversed(self.variants) if dynamic or v is self._serving}

        def forward(*args):
            run = runs.get(id(self._serving))
            if run is None:
                run = runs[id(self._serving)] = self._compile_variant(dynamo_gm, example_inputs, self._serving)
            return run(*args)

        return forward

    def _compile_variant(self, dynamo_gm: fx.GraphModule, example_inputs: list, variant: Variant):
        # A fresh GraphModule: dynamo inspects its own graph after we return, and a
        # graph without dynamo's metadata lets our added constant inputs through aot.
        gm = fx.GraphModule(dynamo_gm, copy.deepcopy(dynamo_gm.graph))
        inputs = GraphInputs(gm.graph, example_inputs, made=self._made_constants)
        ctx = PassContext(inputs=inputs, attention=self._layers, quantization=self.quantization,
                          tensor_parallel=self.tensor_parallel, lora=self.lora, pipeline=self.pipeline,
                          expert_load=self.expert_load, hidden_stash=self.hidden_stash)
        for p in variant.passes:
            variant.matches[p.__name__] += p(gm.graph, ctx)
        if self.quantization is not None:  # a placeholder left in use computes with NaN
            by_placeholder = {**self.quantization.by_placeholder(), **self.quantization.experts_by_placeholder()}
            left = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.users
                    and id(inputs.tensor(n)) in by_placeholder]
            if left:
                raise CompileError(f"{variant.name}: the model is FP8-quantized but its graph still reads the "
                                   f"placeholder weights {left[:3]}{' ...' if len(left) > 3 else ''} after the "
                                   "passes: the pass list needs quantize_linears (trtllm.passes.PASSES has it)")
        if self.tensor_parallel is not None:  # a rank that loaded only its slices: nothing reads a stand-in whole
            refuse_reads_of_unloaded(gm.graph, inputs, ctx.lm_head, variant.name)
        gm.graph.lint()
        gm.recompile()
        if variant.num_graphs and (ctx.lm_head is None) != (variant.lm_head is None):
            raise CompileError(f"{variant.name}: a recompiled graph differs in whether its LM head was split")
        self.graphs.append(gm)
        variant.graphs.append(gm)
        variant.lm_head = ctx.lm_head
        self._after_first_call += ctx.after_first_call
        self.notes.update(dict.fromkeys(ctx.notes))
        constants = list(inputs.constants)
        work = inductor_work(gm.graph)
        inductor = self.inductor if self.inductor is not None else (
            self.device.type == "cuda" and worth_inductor(work, self.attention.num_layers))
        variant.inductor_work = work if inductor else None
        if inductor:
            from torch._inductor.compile_fx import compile_fx
            declare_inductor_fallbacks(gm.graph)
            run = compile_fx(gm, list(example_inputs) + static_fakes(constants, example_inputs))
        else:
            run = gm.forward

        def forward(*args):
            (out,) = run(*args, *constants)  # hidden [B, S, H] if the head was split, else logits
            return (out,)

        return forward

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V]; or [N, V] for the flat token indices `logits_indices`
        (into the B*S tokens), the only rows the LM head is then computed for."""
        workers = self.tensor_parallel.workers if self.tensor_parallel is not None else None
        if workers is None:
            return self._call(input_ids, positions, logits_indices)
        # rank 0 of a parallel group: every rank runs this call, on its own slices or stage
        workers.send_step(input_ids, positions, logits_indices, self._in_decode_graphs, self.lora)
        try:
            out = self._call(input_ids, positions, logits_indices)
            if self.pipeline is None or self.pipeline.is_last:
                return out
            # the first of several stages: `out` goes on to the next; the logits come back from
            # the last, later (`pending`: what the runner waits for before it samples)
            if self.pending is not None:  # a call whose logits nobody took (the KV profiling call)
                self.pending.synchronize()
            out, self.pending = workers.pass_on(out, input_ids, logits_indices)
            if not in_attention_context() and self.pending is not None:  # not the runtime's: wait now
                self.take_pending().synchronize()
            return out
        except Exception as e:  # a collective failed: name the rank that failed it
            raise workers.failure(e) from e

    def take_pending(self):
        """What the last call's logits still wait for (a pipeline's first stage: the last stage's
        send; its `synchronize()` waits), or None when they are computed already."""
        pending, self.pending = self.pending, None
        return pending

    def _call(self, input_ids: torch.Tensor, positions: torch.Tensor,
              logits_indices: torch.Tensor | None) -> torch.Tensor:
        variant = next(v for v in self.variants if (self._in_decode_graphs or not v.decode_graphs_only)
                       and (v.max_tokens is None or input_ids.shape[-1] <= v.max_tokens))
        spec = self.attention
        scope = contextlib.nullcontext() if in_attention_context() else whole_sequences_context(
            *input_ids.shape, self.block_size, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype,
            self.device, values=not spec.latent)  # B whole sequences of S tokens, on a scratch cache
        with scope, torch.no_grad():
            with torch._dynamo.config.patch(**_DYNAMO_CONFIG), fx_config.patch(**_SHAPE_CONFIG):
                mark_token_dim_dynamic(input_ids, positions)
                self._serving = variant
                try:
                    graphs, started = len(self.graphs), time.perf_counter()
                    out = self._compiled(input_ids, positions)
                    if len(self.graphs) != graphs:  # this call compiled
                        self.compile_s += time.perf_counter() - started
                except torch._dynamo.exc.BackendCompilerFailed as e:
                    if isinstance(e.inner_exception, CompileError):
                        raise e.inner_exception from None  # the pass's own message, not dynamo's
                    raise
            if logits_indices is not None and (self.pipeline is None or self.pipeline.is_last):
                out = out.flatten(0, 1).index_select(0, logits_indices)  # [N, H or V]
            if variant.lm_head is not None:
                out = variant.lm_head(out)
        while self._after_first_call:
            self._after_first_call.pop()()
        return out

    @property
    def matches(self) -> collections.Counter[str]:
        """Rewrites per pass: a pass every call runs counted in the ordinary calls' graphs,
        a decode-graph pass in the decode graphs'."""
        out: collections.Counter[str] = collections.Counter()
        for v in reversed(self.variants):
            for name, count in v.matches.items():
                out.setdefault(name, count)
        return out

    def summary(self) -> str:
        """What compiling did, for people and tests (trtllm/compile_summary.py)."""
        return summarize(self)


def refuse_reads_of_unloaded(graph: fx.Graph, inputs: GraphInputs, lm_head: LMHead | None, where: str) -> None:
    """A tensor-parallel rank loads only the slices the sharding passes read (the rest are
    stand-ins of zeros, parallel/tensor_parallel.py `unloaded`): after the passes, no graph
    input and no LM head may still be one (a pass list without a sharding pass, a layer no pass
    recognised)."""
    read = [n for n in graph.nodes if n.op == "placeholder" and n.users and inputs.tensor(n) is not None
            and is_unloaded(inputs.tensor(n))]
    if read:
        users = ", ".join(u.name for u in read[0].users)
        raise CompileError(f"{where}: this rank loaded only the slices tensor parallelism splits, but the graph "
                           f"reads {read[0].name} whole (in {users}){f' and {len(read) - 1} more' if len(read) > 1 else ''}")
    if lm_head is not None and is_unloaded(lm_head.weight):
        raise CompileError(f"{where}: this rank did not load the LM head's weight, and no pass split it by vocabulary")


def mark_token_dim_dynamic(input_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Compile the token dim dynamic from the first call, not on the second.

    Left to dynamo, the first call compiles for its exact token count and the second, of
    another count, compiles again with the dim dynamic: the runtime's KV profiling call
    (max_num_tokens) and first CUDA-graph capture each paid for a graph used once, and the
    user's first prefill paid the recompile (issue 19: startup, and the first run slower
    than the second). A first call of 1 token is left static (its graph's size hints would
    be 1); under _SHAPE_CONFIG a dynamic dim serves 1 too, so the batch-1 decode graph
    needs no capture of its own."""
    if input_ids.shape[-1] >= 2:
        torch._dynamo.maybe_mark_dynamic(input_ids, input_ids.dim() - 1)
        torch._dynamo.maybe_mark_dynamic(positions, positions.dim() - 1)


def static_fakes(constants: list[torch.Tensor], example_inputs: list) -> list[torch.Tensor]:
    """The passes' constant inputs as fake tensors of static shape in dynamo's fake mode.

    Handed over real, aot_autograd (torch 2.11) fakes them with a fresh symbol per dim
    that no dynamo source names; when Inductor then guards on one (on CUDA, e.g.
    `4*s7 <= 2**31-1` from can_use_32bit_indexing for a fused weight), dynamo's guard
    building fails with `IndexError: list index out of range` in produce_guards
    (issue 17: Gemma-2 on the H200). A constant's shape never changes: it is static."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return constants
    return [fake_mode.from_tensor(c, static_shapes=True) for c in constants]


def compile(model: nn.Module, **options) -> CompiledModel:
    """Compile a causal LM (see module docstring). Options: inductor (True, False, or None: where
    the passes left work for it, on CUDA; trtllm/inductor_choice.py), passes,
    decode_graph_passes, block_size, quantization (an Fp8Linears; by default the one loading
    or quantize_model put on the model, trtllm/quantization), tensor_parallel (this rank's
    `TensorParallel`: passes/shard_tensor_parallel.py keeps its slice of each layer), pipeline
    (this rank's `PipelineStage`: passes/split_pipeline_stage.py keeps its stage's layers; a stage
    after the first reads its input inside `pipeline_parallel.stage_input(hidden)`, one before the
    last returns hidden states [B, S, H], not logits), lora (a
    `LoraSlots`: passes/apply_lora.py adds each token's adapter to the targeted linears), expert_load
    (an `ExpertLoad`: fuse_moe counts each MoE block's tokens per expert, trtllm/expert_load.py),
    hidden_stash (a `HiddenStash`: passes/stash_hidden_states.py keeps the states leaving the named
    decoder layers a row per KV slot, for an EAGLE-3 draft; `set_hidden_stash` before the first call)."""
    return CompiledModel(model, **options)
