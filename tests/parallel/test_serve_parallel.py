"""`trtllm-serve --tp_size 2` and `--pp_size 2`: the engine process starts a worker for rank 1;
served greedy text is one rank's offline text; SIGTERM stops the server, its engine and the
worker (exit code 0)."""
from __future__ import annotations

import pytest

from tests.serve.server import BUILD, KV_MAX_TOKENS, Server, write_model
from trtllm import LLM, SamplingParams
from trtllm.config import BuildConfig, KvCacheConfig


@pytest.mark.slow
@pytest.mark.parametrize("size", [["--tp_size", "2"], ["--pp_size", "2"]])
def test_two_ranks_serve_one_ranks_text_and_stop_cleanly(tmp_path, monkeypatch, size):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model_dir = write_model(tmp_path / "model")
    prompts = ["Hello there", "The quick brown fox jumps"]
    with Server(model_dir, *size, log_path=tmp_path / "server.log") as server:
        served = [server.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 8,
                                                       "temperature": 0, "ignore_eos": True}).json()
                  for p in prompts]
        assert server.stop() == 0, server.log()
    with LLM(str(model_dir), dtype="float32", build_config=BuildConfig(**BUILD),
             kv_cache_config=KvCacheConfig(max_tokens=KV_MAX_TOKENS)) as llm:
        offline = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert [r["choices"][0]["text"] for r in served] == [o.outputs[0].text for o in offline]


@pytest.mark.slow
def test_two_tensor_parallel_ranks_serve_an_adapter_by_its_name(tmp_path, monkeypatch):
    # --lora_modules under --tp_size 2: every rank writes its part of the adapter (docs/lora.md)
    from tests.lora_adapters import write_adapter
    from trtllm import LoraConfig, LoRARequest
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model_dir = write_model(tmp_path / "model")
    write_adapter(model_dir, tmp_path / "adapter", r=8, seed=4)
    body = {"model": "style", "prompt": "The quick brown fox jumps", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    with Server(model_dir, "--tp_size", "2", "--lora_modules", f"style={tmp_path / 'adapter'}",
                log_path=tmp_path / "server.log") as server:
        served = server.post("/v1/completions", json=body).json()["choices"][0]["text"]
        base = server.post("/v1/completions", json={**body, "model": "tiny"}).json()["choices"][0]["text"]
        assert server.stop() == 0, server.log()
    with LLM(str(model_dir), dtype="float32", build_config=BuildConfig(**BUILD),
             kv_cache_config=KvCacheConfig(max_tokens=KV_MAX_TOKENS), lora_config=LoraConfig(max_lora_rank=8)) as llm:
        offline = llm.generate(body["prompt"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                               lora_request=LoRARequest("style", 1, str(tmp_path / "adapter")))
    assert served == offline.outputs[0].text and served != base


@pytest.mark.parametrize("size,why", [
    (["--tp_size", "3"], "num_attention_heads=4 does not divide among tensor_parallel_size=3"),
    (["--pp_size", "3"], "pipeline_parallel_size=3 is more stages than the model's num_hidden_layers=2"),
    (["--pp_size", "2", "--pp_partition", "1", "2"], r"pp_partition=\[1, 2\] sums to 3 layers"),
])
def test_sizes_that_do_not_divide_fail_the_start_naming_the_numbers(tmp_path, size, why):
    from trtllm.cli.serve import engine_options, parse_args
    from trtllm.runtime.build_engine import build_engine

    model_dir = write_model(tmp_path / "model")
    options = engine_options(parse_args([str(model_dir), *size, "--dtype", "float32"]))
    with pytest.raises(ValueError, match=why):
        build_engine(str(model_dir), **options)
