"""The import graph of trtllm/ has no upward edge and no loop.

Layers, lowest first; a module imports trtllm modules of its own layer or lower ones only:

    config, sampling_params        user-facing values (TensorRT-LLM's names; what a validated config
                                   is: validated_config; LoRA's: lora_config); a rank's place in a
                                   tensor-parallel group (parallel.tensor_parallel) and how its
                                   MoE layers split (parallel.expert_parallel)
    kernels                        ops: reference, Triton kernel, launcher, registration
    attention_context              how the cache and metadata reach the graph's attention op;
      traced_sdpa                  SDPA as the op dynamo records for models/attention.py;
      mla_attention                the graph op of multi-head latent attention over the latent cache;
      lora_slots                   how LoRA adapters' weights and per-token slots reach the graph
      expert_load                  the MoE blocks' device counters of tokens per expert
      multimodal_context           how image features reach the graph's splice op
      hidden_states                hidden states kept per KV slot for EAGLE-3 drafts
      parallel.pipeline_parallel   how a pipeline stage's input reaches the graph; the layer partition
    quantization                   the FP8 description of a model, online quantization, checkpoint layouts;
      models.checkpoint_config,    a checkpoint's files as read before any model: config.json and its
      models.checkpoint_tensors,   checks, the safetensors headers, the per-expert tensors' slots
      models.expert_tensors
    models, demo                   model files and loading; the built-in demo model
    contract                       what a compilable model is: the probe, its spec, the refusals
    passes                         graph rewrites, each one function
    compile                        the pipeline: probe -> capture -> passes -> Inductor
    runtime, parallel              the engine: scheduler, model runner, sampler, LLM; its
                                   tensor-parallel workers
    serve, eval                    the OpenAI-compatible server; evaluation on the engine
    cli                            the commands
    trtllm (the package __init__)  the public names

Besides: `compile` and `passes` import no model file (the contract is their one door to
models). No loop: no cycle among trtllm modules through the imports that run when a
module is imported (module level; an import inside a function, or under `if TYPE_CHECKING:`,
runs later or never, and is held to the layers only). Edges are read with `ast` from the source, so this needs no import of
trtllm. Check it with

    python -m pytest -q tests/test_layering.py
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trtllm"

LAYERS = [
    ["trtllm.config", "trtllm.validated_config", "trtllm.lora_config", "trtllm.sampling_params",
     "trtllm.guided_decoding_params", "trtllm.logits_processor", "trtllm.lora_request",
     "trtllm.parallel.tensor_parallel", "trtllm.parallel.expert_parallel"],
    ["trtllm.kernels"],
    ["trtllm.attention_context", "trtllm.traced_sdpa", "trtllm.expert_load", "trtllm.mla_attention", "trtllm.lora_slots", "trtllm.multimodal_context", "trtllm.hidden_states", "trtllm.parallel.pipeline_parallel"],
    ["trtllm.quantization", "trtllm.models.checkpoint_config", "trtllm.models.checkpoint_tensors",
     "trtllm.models.expert_tensors"],
    ["trtllm.models", "trtllm.demo"],
    ["trtllm.contract"],
    ["trtllm.passes"],
    ["trtllm.compile", "trtllm.compile_encoder", "trtllm.compile_summary", "trtllm.inductor_choice",
     "trtllm.inductor_fallbacks"],
    ["trtllm.runtime", "trtllm.parallel"],
    ["trtllm.serve", "trtllm.eval"],
    ["trtllm.cli"],
    ["trtllm"],
]

# (importer, imported): edges the layer order would allow but the design does not
FORBIDDEN = [
    ("trtllm.compile", "trtllm.models"),
    ("trtllm.passes", "trtllm.models"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer(module: str) -> int:
    """Index in LAYERS of the longest prefix naming `module` ("trtllm" names the package
    __init__ alone)."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p if p == "trtllm" else _under(module, p)) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best[0]


def _resolve(importer: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The trtllm modules an import statement names (`from pkg import sub` names pkg.sub
    when sub is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package
            package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:  # `import trtllm.x.y` of a name inside a module
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def _type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (annotations only): its imports never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(every trtllm module `module` imports, those imported when it is imported)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    every, at_import = set(), set()

    def visit(node: ast.AST, runs_at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = set(_resolve(module, child)) - {module}
                every.update(names)
                if runs_at_import:
                    at_import.update(names)
            deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _type_checking(child)
            visit(child, runs_at_import and not deferred)

    visit(tree, True)
    return every, at_import


EDGES = {m: _imports(m) for m in sorted(MODULES)}


def test_every_module_sits_in_a_layer():
    for module in MODULES:
        layer(module)


def test_no_upward_import():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, (every, _) in EDGES.items() for d in sorted(every) if layer(d) > layer(m)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_forbidden_import():
    bad = [f"{m} imports {d}" for m, (every, _) in EDGES.items() for d in sorted(every)
           for importer, imported in FORBIDDEN if _under(m, importer) and _under(d, imported)]
    assert not bad, "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph `edges`, as a list of nodes with the first repeated
    at the end, or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle({m: at_import for m, (_, at_import) in EDGES.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_should():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert layer("trtllm.compile") > layer("trtllm.passes") > layer("trtllm.contract") \
        > layer("trtllm.attention_context") > layer("trtllm.kernels")
    assert layer("trtllm.runtime.model_runner") > layer("trtllm.compile")
    assert layer("trtllm") > layer("trtllm.cli")
    # a function-level import counts for the layers, not for cycles
    tree_edges = EDGES["trtllm.contract"]
    assert "trtllm.models.hf" in tree_edges[0] and "trtllm.models.hf" not in tree_edges[1]
