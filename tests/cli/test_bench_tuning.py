"""trtllm-bench throughput's max_batch_size from the KV pool (cli/bench_tuning.py): the weight and
KV estimates against real modules, and the batch rule's bounds."""
from types import SimpleNamespace

import pytest
import torch

from trtllm.cli.bench import main
from trtllm.cli.bench_tuning import (
    DEFAULT_BATCH,
    MAX_BATCH,
    kv_bytes_per_token,
    kv_tokens,
    throughput_batch,
    weight_bytes,
)
from trtllm.cli.model_arg import resolve_model


def requests(n: int, prompt: int, output: int) -> list:
    return [SimpleNamespace(input_len=prompt, output_tokens=output)] * n


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3-moe", "tiny-deepseek-v2"])
def test_weight_estimate_is_the_modules_parameter_bytes(preset):
    """Dense, MoE and latent-attention configs: within 2% of the built module's bytes (norms and
    biases are what the estimate leaves out)."""
    spec = resolve_model(preset)
    model = spec.llm_kwargs()["model"]
    real = sum(p.numel() for p in model.parameters()) * 2
    assert abs(weight_bytes(spec.config, 2) - real) <= 0.02 * real, (weight_bytes(spec.config, 2), real)


def test_kv_bytes_per_token():
    config = resolve_model("llama-3.1-8b").config  # 32 layers x 8 KV heads x 128, K and V
    assert kv_bytes_per_token(config, 2) == 2 * 32 * 8 * 128 * 2
    latent = resolve_model("deepseek-v2-lite").config  # one latent row of 512 + 64 a layer
    assert kv_bytes_per_token(latent, 2) == latent["num_hidden_layers"] * (512 + 64) * 2


def test_the_batch_fills_the_pool_within_its_bounds():
    config = resolve_model("llama-3.1-8b").config
    h200 = kv_tokens(config, 141e9, 0.9, 2, 2)  # ~16 GB of weights: ~850k tokens of bf16 KV
    assert 800_000 < h200 < 900_000
    assert throughput_batch(requests(1024, 128, 128), h200) == MAX_BATCH  # ~3,300 would fit
    assert throughput_batch(requests(100, 128, 128), h200) == DEFAULT_BATCH  # the requests, 128, under the floor
    assert throughput_batch(requests(600, 128, 128), h200) == 640  # the requests rounded up to 64
    assert throughput_batch(requests(512, 2048, 128), h200) == 320  # 0.9 x 388 sequences of 2,176, down to 64
    assert throughput_batch(requests(512, 2048, 128), 100_000) == DEFAULT_BATCH  # the old default is the floor
    assert throughput_batch(requests(512, 128, 128), None) == DEFAULT_BATCH  # no GPU
    assert kv_tokens({"hidden_size": 8}, 80e9, 0.9, 2, 2) is None  # a config it cannot read


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU tunes the batch")
def test_throughput_without_a_gpu_keeps_256(tmp_path):
    dataset, report = tmp_path / "d.jsonl", tmp_path / "r.json"
    assert main(["--model", "tiny-llama", "prepare-dataset", "--num_requests", "3", "--input_mean", "8",
                 "--output_mean", "2", "--output", str(dataset)]) == 0
    assert main(["--model", "tiny-llama", "throughput", "--dataset", str(dataset), "--warmup", "0",
                 "--report_json", str(report)]) == 0
    import json
    assert json.loads(report.read_text())["config"]["engine"]["max_batch_size"] == DEFAULT_BATCH


def test_the_batch_reads_the_options_file(tmp_path, monkeypatch):
    # the KV pool's dtype and fraction in --extra_llm_api_options size the batch as the flags' do
    # (it was sized from the flags alone, then the file changed the pool under it)
    from trtllm.cli.bench_tuning import batch_for_run
    from trtllm.cli.llm_api_options import apply_llm_api_options
    from trtllm.config import BuildConfig, KvCacheConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=141e9))
    config, work = resolve_model("llama-3.1-8b").config, requests(1024, 2048, 128)
    flags = dict(build_config=BuildConfig(max_seq_len=2176), kv_cache_config=KvCacheConfig(), quant_config=None,
                 dtype="auto")
    assert batch_for_run(work, config, flags) == 320  # bf16 KV: as in the test above
    options = tmp_path / "o.yml"
    options.write_text("kv_cache_config:\n  dtype: fp8\n")
    fp8 = apply_llm_api_options(flags, options, "trtllm-bench")
    assert batch_for_run(work, config, fp8) == 640  # twice the tokens: 0.9 x 782 sequences, down to 64
    options.write_text("kv_cache_config:\n  free_gpu_memory_fraction: 0.5\n")
    assert batch_for_run(work, config, apply_llm_api_options(flags, options, "trtllm-bench")) == DEFAULT_BATCH
    options.write_text("kv_cache_config:\n  max_tokens: 1000000\n")
    assert batch_for_run(work, config, apply_llm_api_options(flags, options, "trtllm-bench")) == 384
    # a batch the file gives is the file's: bench leaves it alone
    assert "max_batch_size" not in fp8["build_config"].model_fields_set
    options.write_text("max_batch_size: 96\n")
    assert "max_batch_size" in apply_llm_api_options(flags, options, "trtllm-bench")["build_config"].model_fields_set
