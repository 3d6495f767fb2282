"""LoRA over FP8 linears: a pre-quantized checkpoint's (and QuantConfig's online FP8) linears
become FP8 GEMMs, and an adapter adds its shrink of the input in the model's dtype and its
expand onto the GEMM's output, as peft's LoRA over a quantized base layer computes. Greedy
tokens equal peft's model over the FP8 reference (tests/quantization/fp8_checkpoints.py),
alone and in a batch with base requests; also on two tensor-parallel ranks."""
import multiprocessing

import pytest
import torch

from tests.lora_adapters import peft_greedy, write_adapter
from tests.models.checkpoints import write_checkpoint
from tests.quantization.fp8_checkpoints import fp8_reference, write_fp8_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, BuildConfig, KvCacheConfig, LoraConfig, LoRARequest, SamplingParams
from trtllm.config import QuantAlgo, QuantConfig

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 3], list(range(60, 81))]
NEW = 6
PARAMS = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # whole engines on the ops' references
    yield
    assert multiprocessing.active_children() == []


def lora_llm(path, **kwargs):
    return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512),
               build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=64),
               lora_config=LoraConfig(max_lora_rank=8, max_loras=2), **kwargs)


def tokens(llm, prompts, requests=None):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=requests)]


@pytest.mark.parametrize("layout,granularity,static", [("hf_fp8", "channel", False),
                                                        ("compressed_tensors", "tensor", True)])
def test_an_adapter_over_an_fp8_checkpoint_equals_peft_over_the_fp8_reference(tmp_path, layout, granularity,
                                                                              static):
    from peft import PeftModel
    src = write_checkpoint("llama31", tmp_path / "bf16", vocab_size=512)
    make_tokenizer(src)
    linears = write_fp8_checkpoint(src, tmp_path / "fp8", layout, granularity, static)
    write_adapter(src, tmp_path / "adapter", r=8, seed=5)
    request = LoRARequest("adapter", 1, str(tmp_path / "adapter"))
    reference = fp8_reference(src, linears)
    base = [peft_greedy(reference, p, NEW) for p in PROMPTS]
    want = [peft_greedy(PeftModel.from_pretrained(reference, str(tmp_path / "adapter")).eval(), p, NEW)
            for p in PROMPTS]
    assert want != base, "the adapter changes nothing: the test could not fail"
    with lora_llm(tmp_path / "fp8") as llm:
        assert tokens(llm, PROMPTS + PROMPTS, [request] * 3 + [None] * 3) == want + base
        graph = [n.target for n in llm.compiled.graphs[0].graph.nodes if n.op == "call_function"]
        assert graph.count(torch.ops.trtllm.fp8_gemm.default) == 8  # qkv, o, gate-up, down x 2 layers
        assert graph.count(torch.ops.trtllm.lora_expand.default) == 8  # each wrapped


def test_online_fp8_with_an_adapter_on_two_tensor_parallel_ranks_gives_one_ranks_tokens(tmp_path):
    src = write_checkpoint("llama31", tmp_path / "bf16", vocab_size=512)
    make_tokenizer(src)
    write_adapter(src, tmp_path / "adapter", r=8, seed=6)
    request = LoRARequest("adapter", 1, str(tmp_path / "adapter"))
    fp8 = QuantConfig(quant_algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
    with lora_llm(src, quant_config=fp8) as llm:
        expected = tokens(llm, PROMPTS + PROMPTS, [request] * 3 + [None] * 3)
    assert expected[:3] != expected[3:]
    with lora_llm(src, quant_config=fp8, tensor_parallel_size=2, device="cpu") as llm:
        assert tokens(llm, PROMPTS + PROMPTS, [request] * 3 + [None] * 3) == expected
