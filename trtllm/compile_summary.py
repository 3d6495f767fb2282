"""`CompiledModel.summary()` (trtllm/compile.py): what compiling a model did, as text."""
from __future__ import annotations

import collections

import torch.fx as fx

from trtllm.contract import model_path


def summarize(compiled) -> str:
    """The model, its attention layers, the rewrites per pass (a pass every call runs counted in
    the ordinary calls' graphs, a decode-graph pass in the decode graphs'), the trtllm ops in the
    ordinary calls' graphs and what the other variants have instead, what was left as captured,
    and how the LM head is applied."""
    spec = compiled.attention
    ordinary, *others = reversed(compiled.variants)
    ops, *other_ops = [_trtllm_ops(v.graphs) for v in (ordinary, *others)]
    layers = f"{spec.num_layers} attention layers ({spec.num_kv_heads} kv heads x {spec.head_dim})"
    if spec.latent:
        layers = f"{spec.num_layers} multi-head latent attention layers (a latent cache row of {spec.head_dim})"
    if any(spec.windows):
        layers += f", sliding windows per layer {list(spec.windows)}"
    if any(spec.softcaps):
        layers += f", logit soft-capping per layer {list(spec.softcaps)}"
    if spec.alibi_slopes:
        layers += f", ALiBi slopes per head {[round(s, 6) for s in spec.alibi_slopes]}"
    path = f"model: {model_path(compiled.module)}\n"
    if compiled.quantization is not None:
        path += f"quantization: {compiled.quantization.summary()}\n"
    if not compiled.graphs:
        return (f"{path}trtllm.compile: {layers}; nothing compiled yet: compilation is lazy, the first call "
                "(or building an LLM on it) captures and rewrites the graphs")
    lines = [path.rstrip(), f"trtllm.compile: {compiled.captures} capture(s) of the model, {len(compiled.graphs)} "
             f"graph(s), {layers}", "rewrites:"]
    matches = compiled.matches
    lines += [f"  {p.__name__}: {matches[p.__name__]}" for p in compiled.passes + compiled.decode_graph_passes]
    lines.append(f"trtllm ops in the final graph(s) of {ordinary.name}:")
    lines += [f"  {name}: {count}" for name, count in sorted(ops.items())] or ["  (none)"]
    for v, counted in zip(others, other_ops):
        differ = sorted((name, count) for name, count in counted.items() if ops.get(name) != count)
        lines.append(f"  in {v.name} instead: " + (", ".join(f"{n}: {c}" for n, c in differ) or "the same"))
    lines.append(_inductor_line(compiled))
    if compiled.notes:
        lines.append("left as captured:")
        lines += [f"  {note}" for note in compiled.notes]
    heads = [v for v in compiled.variants if v.lm_head is not None]
    if heads:
        named = [f"{v.lm_head.op_name} in {v.name}" for v in heads if v.lm_head.op_name != "F.linear"]
        split = " on this rank's vocabulary rows, all-gathered" if any(v.lm_head.gather for v in heads) else ""
        lines.append(f"lm head (outside the graph, on the chosen rows): {', '.join(named) or 'F.linear'}{split}")
    return "\n".join(lines)


def _inductor_line(compiled) -> str:
    """Which variants Inductor compiled, and the work the passes left it (inductor_choice.py)."""
    by = [v for v in reversed(compiled.variants) if v.inductor_work is not None]
    if not by:
        why = "inductor=False" if compiled.inductor is False else (
            "the passes left no work in the layers to fuse" if compiled.device.type == "cuda" else "CPU")
        return f"Inductor: none; the graphs run as the passes left them ({why})"
    work = collections.Counter(by[0].inductor_work)
    left = ", ".join(f"{op}: {n}" for op, n in work.most_common(6)) + (" ..." if len(work) > 6 else "")
    return f"Inductor: compiled {', '.join(v.name for v in by)}; work the passes left: {left or '(none)'}"


def _trtllm_ops(graphs: list[fx.GraphModule]) -> collections.Counter[str]:
    return collections.Counter(str(n.target).removesuffix(".default") for gm in graphs for n in gm.graph.nodes
                               if n.op == "call_function" and str(n.target).startswith("trtllm."))
