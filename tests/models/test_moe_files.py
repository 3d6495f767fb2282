"""models/qwen3_moe.py, mixtral.py, qwen2_moe.py, olmoe.py: transformers' MoE families in our files. The checkpoint's per-expert tensors
stacked into the 3-D experts by the loader; eager logits equal HF's in both forms of the experts'
forward; the router kept out of FP8 quantization while the experts become FP8 experts; a
checkpoint missing an expert, or of another expert width, refused naming the tensors.
(Greedy against HF generate through LLM: tests/runtime/test_llm_families.py.)"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.checkpoints import hf_model, random_batch, write_checkpoint
from trtllm.config import QuantAlgo
from trtllm.models import mixtral, olmoe, qwen2_moe, qwen3_moe
from trtllm.models.loader import load_model
from trtllm.quantization.fp8_linears import fp8_linears_of


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"), vocab_size=512)


def test_loads_the_per_expert_tensors_stacked(path):
    model = load_model(path, dtype=torch.float32, device="cpu")
    assert isinstance(model, qwen3_moe.Qwen3MoeForCausalLM)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["MLP", "SparseMoeBlock"]  # mlp_only_layers
    stored = load_file(path / "model.safetensors")
    experts = model.model.layers[1].mlp.experts
    inter = experts.down_proj.shape[2]
    for e in range(experts.gate_up_proj.shape[0]):
        prefix = f"model.layers.1.mlp.experts.{e}"
        assert torch.equal(experts.gate_up_proj[e, :inter], stored[f"{prefix}.gate_proj.weight"])
        assert torch.equal(experts.gate_up_proj[e, inter:], stored[f"{prefix}.up_proj.weight"])
        assert torch.equal(experts.down_proj[e], stored[f"{prefix}.down_proj.weight"])


@pytest.mark.parametrize("seq_len", [5, 40], ids=["gathered", "looped"])  # 2 x 5 x 2 slots <= 64 < 1 x 40 x 2
def test_eager_logits_equal_hf(path, seq_len):
    model = load_model(path, dtype=torch.float32, device="cpu")
    ids = random_batch(512, batch=2 if seq_len == 5 else 1, seq_len=seq_len)
    positions = torch.arange(seq_len).expand(ids.shape[0], seq_len)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, positions), hf_model(path)(ids).logits, rtol=1e-5, atol=1e-5)


def test_fp8_quantizes_the_experts_and_not_the_router(path):
    model = load_model(path, dtype=torch.float32, device="cpu", quant_algo=QuantAlgo.FP8)
    linears = fp8_linears_of(model)
    assert list(linears.experts) == ["model.layers.1.mlp.experts"]
    assert "model.layers.1.self_attn.q_proj" in linears.linears and "model.layers.0.mlp.gate_proj" in linears.linears
    assert not any("mlp.gate" == p.rpartition(".")[0][-8:] for p in linears.linears)  # the router: not an nn.Linear
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_a_missing_expert_another_width_or_bad_values_are_refused_by_name(path, tmp_path):
    def rewrite(edit):
        copy = shutil.copytree(path, tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}")
        tensors = load_file(copy / "model.safetensors")
        edit(tensors)
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        return copy

    missing = rewrite(lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"holds 7 of the 8 per-expert tensors that make "
                                         r"'model.layers.1.mlp.experts.gate_up_proj': absent "
                                         r"\['model.layers.1.mlp.experts.3.up_proj.weight'\]"):
        load_model(missing, dtype=torch.float32, device="cpu")
    wide = rewrite(lambda t: t.update({"model.layers.1.mlp.experts.2.down_proj.weight": torch.zeros(64, 48)}))
    with pytest.raises(ValueError, match=r"experts.2.down_proj.weight' has shape \(64, 48\), the model expects "
                                         r"\(64, 32\)"):
        load_model(wide, dtype=torch.float32, device="cpu")
    past = rewrite(lambda t: t.update({"model.layers.1.mlp.experts.4.up_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.experts.4.up_proj.weight' is expert 4, but config.json "
                                         r"gives 4 experts \(0\.\.3\)"):
        load_model(past, dtype=torch.float32, device="cpu")  # was: 'has shape (32, 64), the model expects (32, 64)'
    ints = rewrite(lambda t: t.update({"model.layers.1.mlp.experts.2.up_proj.weight": torch.ones(32, 64, dtype=torch.int8)}))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.experts.2.up_proj.weight' is torch.int8, but it is an "
                                         r"expert's weight"):
        load_model(ints, dtype=torch.float32, device="cpu")  # copied into the stack as 1.0s, silently
    nan = rewrite(lambda t: t["model.layers.1.mlp.experts.1.gate_proj.weight"].view(-1).__setitem__(3, float("nan")))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.experts.1.gate_proj.weight' holds 1 NaN"):
        load_model(nan, dtype=torch.float32, device="cpu")  # loaded silently: NaN for the tokens routed there


def test_experts_mixing_float8_and_bf16_tensors_are_refused_by_name(path, tmp_path):
    """A pre-quantized checkpoint's experts load as stored (tests/quantization/test_fp8_moe_checkpoints.py);
    one 3-D parameter made of float8 and bf16 experts is refused, never loaded as either."""
    import json

    from safetensors.torch import load_file, save_file

    from trtllm.quantization import quantize_weight
    copy = shutil.copytree(path, tmp_path / "fp8")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (copy / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(copy / "model.safetensors"))
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    q = quantize_weight(tensors[name].float(), QuantAlgo.FP8)
    tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = q.weight, q.weight_scale
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="experts.gate_up_proj: the checkpoint's per-expert tensors mix float8"):
        load_model(copy, dtype=torch.bfloat16, device="cpu")


def test_mixtral_stacks_w1_w3_w2_and_gives_hf_logits(tmp_path):
    path = write_checkpoint("mixtral", tmp_path / "mixtral", vocab_size=512)
    model = load_model(path, dtype=torch.float32, device="cpu")
    assert isinstance(model, mixtral.MixtralForCausalLM)
    stored = load_file(path / "model.safetensors")
    experts = model.model.layers[0].block_sparse_moe.experts
    inter = experts.down_proj.shape[2]
    prefix = "model.layers.0.block_sparse_moe.experts.3"
    assert torch.equal(experts.gate_up_proj[3, :inter], stored[f"{prefix}.w1.weight"])
    assert torch.equal(experts.gate_up_proj[3, inter:], stored[f"{prefix}.w3.weight"])
    assert torch.equal(experts.down_proj[3], stored[f"{prefix}.w2.weight"])
    for seq_len in (5, 40):  # gathered, looped
        ids = random_batch(512, batch=1, seq_len=seq_len)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, torch.arange(seq_len)[None]), hf_model(path)(ids).logits,
                                       rtol=1e-5, atol=1e-5)


def test_qwen2_moe_with_its_shared_expert_gives_hf_logits(tmp_path):
    path = write_checkpoint("qwen2_moe", tmp_path / "qwen2_moe", vocab_size=512)
    model = load_model(path, dtype=torch.float32, device="cpu")
    assert isinstance(model, qwen2_moe.Qwen2MoeForCausalLM)
    assert model.model.layers[0].mlp.shared_expert.up_proj.weight.shape[0] == 48  # shared_expert_intermediate_size
    for seq_len in (5, 40):  # gathered, looped
        ids = random_batch(512, batch=1, seq_len=seq_len)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, torch.arange(seq_len)[None]), hf_model(path)(ids).logits,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip_qkv", [None, 0.05])
def test_olmoe_with_its_projection_qk_norm_gives_hf_logits(tmp_path, clip_qkv):
    """OLMoE's q_norm / k_norm span the whole projection; clip_qkv (when set) clamps q, k, v after them."""
    import json

    path = write_checkpoint("olmoe", tmp_path / "olmoe", vocab_size=512)
    if clip_qkv is not None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "clip_qkv": clip_qkv}))
    model = load_model(path, dtype=torch.float32, device="cpu")
    assert isinstance(model, olmoe.OlmoeForCausalLM)
    assert model.model.layers[0].self_attn.q_norm.weight.shape[0] == model.config.hidden_size
    for seq_len in (5, 40):  # gathered, looped
        ids = random_batch(512, batch=1, seq_len=seq_len)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, torch.arange(seq_len)[None]), hf_model(path)(ids).logits,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, fields, words", [
    ("qwen3_moe", {"num_experts_per_tok": 0}, r"num_experts_per_tok=0: .* from 1 to the 4 experts"),  # ran, MoE-less
    ("mixtral", {"num_experts_per_tok": 5}, r"num_experts_per_tok=5: .* from 1 to the 4 experts"),  # torch.topk's error
    ("olmoe", {"num_experts_per_tok": "2"}, r"num_experts_per_tok='2'"),
    ("mixtral", {"num_local_experts": 4.0}, r"num_local_experts=4\.0: the number of experts must be an integer"),
    ("deepseek_v3", {"n_group": 3}, r"n_group=3 does not split the 8 experts"),
    ("deepseek_v3", {"topk_group": 3}, r"topk_group=3: the groups chosen per token must be 1 to n_group=2"),
    # 1 group of 4 chosen, top-5: HF's module routed to an expert of a group it masked out
    ("deepseek_v3", {"num_experts_per_tok": 5}, r"num_experts_per_tok=5 is more than the 4 experts of the topk_group=1"),
])
def test_routing_the_experts_cannot_do_is_refused_naming_the_field(tmp_path, family, fields, words):
    path = write_checkpoint(family, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(ValueError, match=rf"config\.json: {words}"):
        load_model(path, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_a_config_without_the_experts_count_is_named(tmp_path, family):
    """Each file read the count with .get: None, then a TypeError deep in building the experts."""
    path = write_checkpoint(family, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("num_experts", "num_local_experts")}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: no 'num_(local_)?experts' field, which \w+ForCausalLM needs"):
        load_model(path, dtype=torch.float32, device="cpu")
