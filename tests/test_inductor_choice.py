"""Which graphs Inductor compiles by default (trtllm/inductor_choice.py): none where the passes
left no work in the layers (our Llama file and HF's: every norm, rotary, SiLU·mul and attention
is our kernel, the rope table is computed from the positions), and those whose layers still
have elementwise work (LayerNorm, GELU, a hand-written RMSNorm, Gemma's GELU·up)."""
import pytest
import torch
import transformers

import trtllm
from tests.models.zoo import ZOO, make
from tests.test_compile import tiny_llama
from trtllm.inductor_choice import inductor_work, worth_inductor


def compiled_graphs(model):
    compiled = trtllm.compile(model)
    compiled(torch.randint(0, 90, (2, 5)), torch.arange(5).expand(2, 5))
    return compiled, [gm.graph for v in compiled.variants for gm in v.graphs]


def hf_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def hf_gemma():
    torch.manual_seed(0)
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)).eval()


@pytest.mark.parametrize("make_model", [tiny_llama, hf_llama], ids=["llama_file", "hf_llama"])
def test_a_llama_leaves_no_work_for_inductor(make_model):
    compiled, graphs = compiled_graphs(make_model())
    assert len(graphs) == 2  # both variants
    for graph in graphs:
        assert inductor_work(graph) == []
        assert not worth_inductor(inductor_work(graph), compiled.attention.num_layers)
    assert "Inductor: none; the graphs run as the passes left them (CPU)" in compiled.summary()


# an op each model's layers leave to Inductor; every zoo model is here (none is fused wholly today)
LEFT_IN_EVERY_LAYER = {"parallel_block": "layer_norm", "post_norm_learned_positions": "gelu",
                       "windowed_rms_norm": "sqrt", "moe": "rms_norm", "gemma": "gelu"}


@pytest.mark.parametrize("name", [*ZOO, "gemma"])
def test_layers_with_elementwise_work_left_get_inductor(name):
    compiled, graphs = compiled_graphs(hf_gemma() if name == "gemma" else make(name, vocab_size=96))
    for graph in graphs:
        work = inductor_work(graph)
        assert work.count(LEFT_IN_EVERY_LAYER[name]) >= compiled.attention.num_layers, work
        assert worth_inductor(work, compiled.attention.num_layers)


def test_views_gemms_and_the_rope_table_are_not_work():
    """Views and GEMMs are not work; a pointwise op on what an embedding gave is, and what only
    the positions feed is not. (A dynamic capture's SymInt arithmetic: the Llama tests.)"""
    weight = torch.randn(16, 8)

    def f(ids, pos):
        h = torch.nn.functional.embedding(ids, weight).view(-1, 8)  # [T, 8]
        table = pos.float() * 2.0  # the positions alone
        return torch.nn.functional.linear(h, h) * table.sum() + h.size(0)

    gm = torch.fx.symbolic_trace(f)
    work = inductor_work(gm.graph)
    assert work == ["mul", "add"], work  # `mul` of the linear, `add`; not the table's float/mul/sum


def test_inductor_forced_on_is_named_in_the_summary():
    compiled = trtllm.compile(tiny_llama(), inductor=True)
    compiled(torch.randint(0, 90, (1, 3)), torch.arange(3)[None])
    assert "Inductor: compiled ordinary calls, decode graphs; work the passes left: (none)" in compiled.summary()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default decides per graph on CUDA only")
def test_on_cuda_the_default_compiles_with_inductor_only_where_work_is_left():
    for model, expected in ((tiny_llama(), "Inductor: none; the graphs run as the passes left them (the passes left "
                             "no work in the layers to fuse)"),
                            (make("parallel_block", vocab_size=96), "Inductor: compiled ordinary calls, decode graphs")):
        compiled = trtllm.compile(model.cuda())
        compiled(torch.randint(0, 90, (2, 5), device="cuda"), torch.arange(5, device="cuda").expand(2, 5))
        assert expected in compiled.summary()


def test_ops_of_other_namespaces_as_packets_are_classified():
    """A graph may call another library's op by its packet (transformers' grouped_mm_fallback in
    an HF MoE): a packet has no `namespace`; it is work like any op that is not ours."""
    graph = torch.fx.Graph()
    ids = graph.placeholder("ids")
    weight = graph.placeholder("weight")
    h = graph.call_function(torch.nn.functional.embedding, (ids, weight))
    graph.output(graph.call_function(torch.ops.aten.mul, (h, 2.0)))
    assert inductor_work(graph) == ["aten.mul"]
    assert not worth_inductor(["aten.mul"], num_layers=2)
    assert worth_inductor(["transformers.grouped_mm_fallback"], num_layers=2)  # another library's op


def test_an_hf_moe_block_fused_leaves_no_work():
    """transformers' Qwen3-MoE block ends with `.to(hidden_states.dtype)` on fused_moe's output,
    a cast to the dtype it has (no kernel): not work. Counted, the 48 of Qwen3-30B-A3B sent it to
    Inductor (minutes of compile on the H200, 2026-12-04). A cast that changes the dtype is work."""
    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    compiled, graphs = compiled_graphs(transformers.Qwen3MoeForCausalLM(config).eval())
    assert all("trtllm.fused_moe.default" in str(g) for g in graphs)
    for graph in graphs:
        assert inductor_work(graph) == [], inductor_work(graph)

    weight = torch.randn(16, 8)

    def f(ids):
        h = torch.nn.functional.embedding(ids, weight)
        return h.to(torch.float32) + h.to(torch.float64).sum()

    gm = torch.fx.symbolic_trace(f)
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(torch.tensor([1, 2]))
    for node in gm.graph.nodes:  # dynamo's captures carry example_value; ShapeProp writes `tensor_meta`
        tm = node.meta.get("tensor_meta")
        if tm is not None:
            node.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype)
    assert inductor_work(gm.graph) == ["to", "sum", "add"]
