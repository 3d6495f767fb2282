"""The built-in demo model (trtllm/demo_model, written by tools/train_demo_model.py).

It is an ordinary HF checkpoint directory: loaded by trtllm.load_model and
transformers.AutoTokenizer like any user checkpoint; greedy generation is deterministic;
its perplexity on the held-out sample shipped beside it stays at what training recorded.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import trtllm
import trtllm.demo
from trtllm.demo import DEMO_MODEL_DIR, HELDOUT_SAMPLE, demo_model_path, greedy_generate, pack, perplexity, read_entries
from trtllm.models.llama import LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time"
PPL_MARGIN = 1.02  # relative: other CPUs' fp32 kernels round differently, by far less than this


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model_path()), local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return trtllm.load_model(demo_model_path(), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def record():
    return json.loads((DEMO_MODEL_DIR / "training.json").read_text())


def test_shipped_checkpoint_is_a_small_hf_llama_dir():
    path = demo_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "training.json", "corpus.json", HELDOUT_SAMPLE):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 16 * 2**20
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == getattr(torch, config["dtype"])
    assert "lm_head.weight" not in names  # tied: saved once, as HF does
    assert {p["name"] for p in json.loads((path / "corpus.json").read_text())["packages"]} >= {"fortunes"}


def test_loads_with_the_configs_dtype(tokenizer):
    m = trtllm.load_model(demo_model_path(), device="cpu")
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert isinstance(m, LlamaForCausalLM)
    assert m.model.embed_tokens.weight.dtype == getattr(torch, config["dtype"])
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.config.vocab_size >= len(tokenizer)
    assert 1e6 < sum(p.numel() for p in m.parameters()) < 10e6


def test_tokenizer(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    ids = tokenizer(PROMPT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|user|>\nHi<|eos|><|assistant|>\n"


def test_greedy_generation_is_deterministic(model, tokenizer):
    a = greedy_generate(model, tokenizer, PROMPT, max_new_tokens=20, stop_at_eos=False)
    b = greedy_generate(model, tokenizer, PROMPT, max_new_tokens=20, stop_at_eos=False)
    assert a == b
    assert a.strip()


def test_heldout_perplexity_is_what_training_reached(model, tokenizer, record):
    sample = record["heldout_sample"]
    ids = pack(tokenizer, read_entries(DEMO_MODEL_DIR / sample["file"]))
    ppl, n = perplexity(model, ids, seq_len=sample["seq_len"])
    assert n == sample["tokens"]
    assert 1.0 < ppl <= sample["perplexity_cpu_fp32"] * PPL_MARGIN, (ppl, sample)
    assert ppl < tokenizer.vocab_size / 4  # far better than chance: it learned something


def test_demo_model_path_names_whats_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(trtllm.demo, "DEMO_MODEL_DIR", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        trtllm.demo.demo_model_path()


@pytest.mark.timeout(180)
def test_training_script_smoke(tmp_path):
    """tools/train_demo_model.py --smoke on the shipped held-out sample as corpus (no download)."""
    corpus = tmp_path / "corpus.txt"
    shutil.copy(DEMO_MODEL_DIR / HELDOUT_SAMPLE, corpus)
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "train_demo_model.py"), "--smoke",
                           "--corpus", str(corpus), "--out", str(out), "--steps", "6", "--eval-every", "3"],
                          capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "training.json").read_text())
    assert record["training"]["steps"] == 6 and record["heldout_perplexity"] > 1
    m = trtllm.load_model(out, dtype=torch.float32, device="cpu")
    assert isinstance(m, LlamaForCausalLM)


def test_bf16_through_the_interpreter_writes_the_reference_text(monkeypatch):
    """The shipped bf16 checkpoint with every kernel in the Triton interpreter (whose bf16
    tl.dot multiplies raw bits: the launchers hand it fp32, kernels/registry.py) writes the
    text the ops' torch references write: a batch of two prompts prefilled, then decoded
    past the end of the first 16-token cache page."""
    from trtllm.config import BuildConfig, KvCacheConfig
    from trtllm.kernels.registry import triton_interpreter_on
    from trtllm.runtime.llm import LLM
    from trtllm.sampling_params import SamplingParams

    assert triton_interpreter_on(), "tests/conftest.py's TRITON_INTERPRET=1 was left off by an earlier test"
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT, "The best way to predict the future is to"]  # 5 and 12 tokens
    with LLM(build_config=BuildConfig(max_batch_size=2, max_num_tokens=64, max_seq_len=64),
             kv_cache_config=KvCacheConfig(max_tokens=256, tokens_per_block=16, enable_block_reuse=False)) as llm:
        assert llm.compiled.attention.dtype == torch.bfloat16
        interpreted = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the same graphs, the ops' references
        reference = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert interpreted == reference
    assert all(text.strip() and "\ufffd" not in text for text in reference), reference


@pytest.mark.parametrize("kv_dtype", ["fp8", "int8"])
def test_quantized_kv_cache_through_the_interpreter_writes_the_reference_text(monkeypatch, kv_dtype):
    """The shipped bf16 checkpoint with an FP8 (scales 1.0) or INT8 (scales calibrated at
    build) KV cache: the paged attention kernels in the Triton interpreter write the text
    the ops' references write (prefill, then decode past the first 16-token page), and the
    text stays text."""
    import warnings

    from trtllm.config import BuildConfig, KvCacheConfig
    from trtllm.runtime.llm import LLM
    from trtllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT, "The best way to predict the future is to"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # INT8's calibration at build on the references: faster
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FP8's scales-1.0 warning
        llm = LLM(build_config=BuildConfig(max_batch_size=2, max_num_tokens=64, max_seq_len=64),
                  kv_cache_config=KvCacheConfig(dtype=kv_dtype, max_tokens=256, tokens_per_block=16,
                                                enable_block_reuse=False))
    with llm:
        assert llm.engine.runner.cache.k.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[kv_dtype]
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        interpreted = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        reference = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert interpreted == reference
    assert all(text.strip() and "\ufffd" not in text for text in reference), reference
