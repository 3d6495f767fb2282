"""trtllm.models.loader.load_model: sharding, dtypes, tying, and every error it names."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import trtllm
from tests.models.checkpoints import random_batch, write_checkpoint
from trtllm.models.llama import LlamaForCausalLM
from trtllm.models.loader import load_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_checkpoint("llama31", tmp_path_factory.mktemp("llama31"))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):  # tied embeddings
    return write_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.fixture
def copy_of(tmp_path):
    def copy(src):
        return shutil.copytree(src, tmp_path / "ckpt")
    return copy


def rewrite_weights(path, edit):
    """Load model.safetensors, apply edit(dict) in place, save it back."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_exported_and_loads_ready_for_inference(llama_dir):
    model = trtllm.load_model(llama_dir, dtype=torch.float32)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and not p.requires_grad for p in params.values())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    hf_state = load_file(llama_dir / "model.safetensors")
    assert set(params) == set(hf_state)
    for name, t in hf_state.items():
        assert torch.equal(params[name], t), name


def test_sharded_checkpoint_loads_identically(llama_dir, tmp_path):
    sharded = write_checkpoint("llama31", tmp_path / "sharded", max_shard_size="40KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_model(llama_dir, dtype=torch.float32), load_model(sharded, dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16", "bfloat16", "torch.bfloat16"])
def test_bf16_load(llama_dir, dtype):
    model = load_model(llama_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_bf16_logits_close_to_fp32(llama_dir):
    ids, pos = random_batch(), torch.arange(12).expand(2, 12)
    ref = load_model(llama_dir, dtype="fp32")(ids, pos)
    got = load_model(llama_dir, dtype="fp16")(ids, pos)
    assert got.dtype == torch.float16
    assert ((got.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_dtype_defaults_to_config(tmp_path):
    path = write_checkpoint("mqa", tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert next(load_model(path).parameters()).dtype == torch.bfloat16  # device None -> cpu here
    config.pop("dtype", None)
    config["torch_dtype"] = "float16"  # the transformers 4 key
    (path / "config.json").write_text(json.dumps(config))
    assert next(load_model(path).parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="int8"):
        load_model(path, dtype="int8")
    config["torch_dtype"] = "float64"  # said as the caller's dtype, which was not given
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^config\.json's dtype \(no dtype given\) 'float64' is not supported"):
        load_model(path)
    assert next(load_model(path, dtype="bf16").parameters()).dtype == torch.bfloat16


def test_tied_weights_share_storage(qwen2_dir):
    model = load_model(qwen2_dir, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.lm_head.weight.is_meta


def test_tied_checkpoint_with_lm_head_anyway(qwen2_dir, copy_of):
    path = copy_of(qwen2_dir)
    rewrite_weights(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = load_model(path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_stored_head_other_than_the_tied_embedding_is_refused(qwen2_dir, copy_of):
    """config.json ties the head, but the checkpoint stores another one: the tie dropped it silently
    (transformers keeps it, untied)."""
    path = copy_of(qwen2_dir)
    rewrite_weights(path, lambda t: t.__setitem__("lm_head.weight", torch.randn_like(t["model.embed_tokens.weight"])))
    with pytest.raises(ValueError, match=r"config\.json ties lm_head\.weight to model\.embed_tokens\.weight "
                                         r"\(tie_word_embeddings\), but the checkpoint stores lm_head\.weight with "
                                         r"other values \(model\.safetensors\): set tie_word_embeddings to false"):
        load_model(path, dtype=torch.float32)


def test_harmless_extra_tensors_ignored(llama_dir, copy_of):
    path = copy_of(llama_dir)
    rewrite_weights(path, lambda t: t.update({
        "model.rotary_emb.inv_freq": torch.ones(8),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(path, dtype=torch.float32)


def test_progress_bar_on_request(llama_dir, capsys):
    load_model(llama_dir, dtype=torch.float32, progress=True)
    assert "loading weights" in capsys.readouterr().err


# ---- errors, each naming the file or tensor ----

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_unknown_architecture(llama_dir, copy_of):
    path = copy_of(llama_dir)
    config = json.loads((path / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FrobnicatorForCausalLM"], "frobnicator"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="transformers cannot build this model without trust_remote_code"):
        load_model(path)


def test_unsupported_config_setting(llama_dir, copy_of):
    path = copy_of(llama_dir)
    config = json.loads((path / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act"):
        load_model(path)


def test_missing_shard(tmp_path):
    path = write_checkpoint("llama2", tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(path)


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    """Whichever shard was read last gave its value, silently."""
    path = write_checkpoint("llama2", tmp_path / "sharded", max_shard_size="40KB")
    first = sorted(path.glob("model-*.safetensors"))[0]
    tensors = load_file(first)
    assert "model.norm.weight" not in tensors
    save_file({**tensors, "model.norm.weight": torch.full((64,), 7.0)}, first, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor 'model\.norm\.weight' is stored twice, in {first.name} and in "):
        load_model(path)


def test_an_index_whose_shard_name_is_not_a_string_is_named(tmp_path):
    path = write_checkpoint("llama2", tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = 3
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json: weight_map's shard file names must be strings: "
                                         r"\{'lm_head\.weight': 3\}"):
        load_model(path)  # was TypeError: unsupported operand type(s) for /: 'PosixPath' and 'int'


def test_missing_tensor(llama_dir, copy_of):
    path = copy_of(llama_dir)
    rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)


def test_untied_checkpoint_without_lm_head(llama_dir, copy_of):
    path = copy_of(llama_dir)
    rewrite_weights(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(path)


def test_shape_mismatch(llama_dir, copy_of):
    path = copy_of(llama_dir)
    rewrite_weights(path, lambda t: t.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        load_model(path)


def test_unexpected_tensor(llama_dir, copy_of):
    path = copy_of(llama_dir)
    rewrite_weights(path, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.ones(3)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_model(path)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "consolidated.pt"])
def test_pickle_checkpoint_is_refused_never_unpickled(llama_dir, copy_of, monkeypatch, filename):
    path = copy_of(llama_dir)
    torch.save(load_file(path / "model.safetensors"), path / filename)
    (path / "model.safetensors").unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the loader must never unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=f"{filename}.*never unpickled.*safe_serialization=True"):
        load_model(path)


def test_no_weights_at_all(llama_dir, copy_of):
    path = copy_of(llama_dir)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(path)


def test_a_file_given_for_the_directory_is_named_as_such(llama_dir, tmp_path):
    with pytest.raises(NotADirectoryError, match=r"config\.json' is a file: give the checkpoint's directory"):
        load_model(llama_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
        load_model(tmp_path / "nowhere")


def test_an_integer_weight_is_refused_by_name(llama_dir, copy_of):
    """An int8 weight without the quantization_config that says how to read it: refused when
    loaded, not a dtype mismatch inside the first matmul."""
    path = copy_of(llama_dir)
    weights = load_file(path / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name] = weights[name].to(torch.int8)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' is torch\.int8, but it is a weight"):
        load_model(path)


@pytest.mark.parametrize("value, dtype, words", [
    (float("nan"), torch.float32, "holds 1 NaN or infinite value"),
    (float("-inf"), torch.bfloat16, "holds 1 NaN or infinite value"),
    (1e6, torch.float16, r"holds 1 NaN or infinite value\(s\) once cast from torch.float32 to torch.float16"),
], ids=["nan", "inf", "past-fp16"])
def test_a_weight_that_is_not_finite_is_refused_by_name(llama_dir, copy_of, value, dtype, words):
    """One bad value loaded silently: NaN logits (or every token the same) at the first step."""
    path = copy_of(llama_dir)
    rewrite_weights(path, lambda t: t["model.layers.1.mlp.down_proj.weight"].view(-1).__setitem__(7, value))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' "
                                         rf"{words}"):
        load_model(path, dtype=dtype)
    if value == 1e6:  # the online FP8 path reads the same cast
        with pytest.raises(ValueError, match="once cast from torch.float32 to torch.float16"):
            load_model(path, dtype=dtype, quant_algo=trtllm.config.QuantAlgo.FP8)


def test_corrupt_config_names_the_file_and_place(llama_dir, copy_of):
    path = copy_of(llama_dir)
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  "hidden_size": 64,,}')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON \(.* line 2, column 21\)"):
        load_model(path)


def test_config_that_is_not_an_object(llama_dir, copy_of):
    path = copy_of(llama_dir)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got list"):
        load_model(path)


@pytest.mark.parametrize("fields, words", [
    ({"num_hidden_layers": "2"}, "num_hidden_layers='2'"),
    ({"hidden_size": -64}, "hidden_size=-64"),
    ({"vocab_size": 512.0, "num_attention_heads": 0}, "vocab_size=512.0, num_attention_heads=0"),
    ({"text_config": {"num_key_value_heads": True}}, "text_config.num_key_value_heads=True"),
])
def test_config_sizes_that_are_not_positive_integers_are_named(llama_dir, copy_of, fields, words):
    path = copy_of(llama_dir)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(ValueError, match=rf"config\.json: {re.escape(words)}: sizes must be positive integers"):
        load_model(path)


@pytest.mark.parametrize("fields, words", [
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps=-1e-05 (a norm epsilon: a number >= 0)"),  # NaN logits, silently
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5' (a norm epsilon: a number >= 0)"),  # a TypeError in the norm
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_parameters.rope_theta=0 (a number > 0)"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 0.0}},
     "rope_parameters.factor=0.0 (a number > 0)"),  # inf frequencies: NaN rotations, and it loaded
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_parameters.low_freq_factor=4.0 >= high_freq_factor=4.0 (llama3 rope blends between them: low < high)"),
    # the check reads every config alike; these are Gemma-2's (ZeroDivisionError at 0), MPT's (clamped every
    # value to -0.3) and Phi-3's fields
    ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None},  # was: k_proj's shape (32, 64) vs (63, 64)
     "hidden_size=64 is not a multiple of num_attention_heads=3 and no head_dim is given"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false' (true or false)"),  # bool("false"): tied
    ({"norm_topk_prob": "false"}, "norm_topk_prob='false' (true or false)"),  # Qwen-MoE: renormalised, silently
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar=0 (a number > 0, or null)"),
    ({"attn_config": {"clip_qkv": -0.3}}, "attn_config.clip_qkv=-0.3 (a number > 0, or null)"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor=1.5 (the rotated share of a head: above 0, at most 1)"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": -4},
     "sliding_window=-4 (a number of tokens >= 0, or null)"),  # taken as a window of -4
])
def test_config_numbers_that_make_no_model_are_named(llama_dir, copy_of, fields, words):
    path = copy_of(llama_dir)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(ValueError, match=rf"config\.json: {re.escape(words)}"):
        load_model(path, dtype=torch.float32)


def test_a_required_field_left_out_or_of_another_kind_is_named(llama_dir, copy_of):
    path = copy_of(llama_dir)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match=r"config\.json: no 'vocab_size' field, which LlamaForCausalLM needs"):
        load_model(path)  # was KeyError: 'vocab_size'
    (path / "config.json").write_text(json.dumps({**config, "rope_parameters": "linear"}))
    with pytest.raises(ValueError, match=r"config\.json: rope_parameters='linear' \(an object of rope parameters"):
        load_model(path)  # was 'dictionary update sequence element #0 has length 1'


@pytest.mark.parametrize("keep", [20, 0.5], ids=["header-cut", "data-cut"])
def test_truncated_safetensors_names_the_file(llama_dir, copy_of, keep):
    path = copy_of(llama_dir)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file .*truncated"):
        load_model(path)


def test_index_without_weight_map(tmp_path):
    sharded = write_checkpoint("llama31", tmp_path / "sharded", max_shard_size="40KB")
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"index\.json: no \"weight_map\""):
        load_model(sharded)


@pytest.mark.parametrize("family, module", [("llama31", "llama"), ("gemma2", "gemma"), ("phi3", "phi3")])
def test_our_model_files_refuse_a_quantization_config_by_name(family, module):
    from tests.models.checkpoints import hf_config
    from trtllm.models.gemma import GemmaConfig
    from trtllm.models.llama import LlamaConfig
    from trtllm.models.phi3 import Phi3Config
    config_cls = {"llama": LlamaConfig, "gemma": GemmaConfig, "phi3": Phi3Config}[module]
    d = hf_config(family).to_dict()
    config_cls.from_hf(d)  # the same config without it is taken
    with pytest.raises(ValueError, match=f"quantization_config is set: trtllm.models.{module} builds unquantized"):
        config_cls.from_hf({**d, "quantization_config": {"quant_method": "fp8"}})
