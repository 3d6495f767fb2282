"""trtllm/quantization/fp8_linears.py: online FP8 weight quantization (each granularity), which
linears a model gives up (not the head, not a tied embedding), the placeholders that keep no
bf16 weight, and QuantConfig's door: LLM(path or module, quant_config=...)."""
import pytest
import torch
import torch.nn as nn

import trtllm
from tests.models.checkpoints import hf_model, write_checkpoint
from tests.quantization.fp8_checkpoints import fake_quantize_input
from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, KvCacheConfig, QuantAlgo, QuantConfig
from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX
from trtllm.quantization import fp8_linears_of, quantize_model, quantize_weight
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

SHAPES = {QuantAlgo.FP8: lambda n, k: (1,), QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: lambda n, k: (n, 1),
          QuantAlgo.FP8_BLOCK_SCALES: lambda n, k: (-(-n // 128), -(-k // 128))}


@pytest.mark.parametrize("algo", list(SHAPES))
@pytest.mark.parametrize("shape", [(200, 130), (64, 48), (1, 1)])
def test_quantize_weight_shapes_and_error(algo, shape):
    w = torch.randn(shape) * torch.logspace(-2, 1, shape[0])[:, None]  # rows of very different size
    q = quantize_weight(w.bfloat16(), algo)
    assert q.weight.dtype == FP8_DTYPE and q.weight.shape == shape and q.weight.is_contiguous()
    assert q.weight_scale.dtype == torch.float32 and tuple(q.weight_scale.shape) == SHAPES[algo](*shape)
    assert q.weight.float().abs().max() <= FP8_MAX
    err = (q.dequantized() - w.bfloat16().float()).abs()
    # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 of the value; the scale's reach bounds the rest
    bound = w.abs().amax() if algo is QuantAlgo.FP8 else w.abs().amax(dim=1, keepdim=True)
    if algo is not QuantAlgo.FP8_BLOCK_SCALES:
        assert (err <= w.bfloat16().float().abs() / 16 + bound / FP8_MAX * 2 ** -6 + 1e-12).all()
    assert ((q.dequantized() - w.bfloat16().float()).norm() / w.norm()) < 0.04


def test_zero_weights_quantize_to_zero_with_a_positive_scale():
    for algo in SHAPES:
        q = quantize_weight(torch.zeros(130, 129), algo)
        assert (q.weight.float() == 0).all() and (q.weight_scale > 0).all()


def test_other_algorithms_are_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match="W4A16_AWQ.*FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_BLOCK_SCALES"):
        quantize_weight(torch.randn(4, 4), QuantAlgo.W4A16_AWQ)


def test_quantize_model_takes_every_linear_but_the_head_and_keeps_no_bf16_copy(tmp_path):
    path = write_checkpoint("llama31", tmp_path)
    model = trtllm.load_model(path, dtype=torch.bfloat16, device="cpu")
    before = {n: p for n, p in model.named_parameters()}
    fp8 = quantize_model(model, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
    assert fp8_linears_of(model) is fp8 and len(fp8.linears) == 2 * 7
    assert "lm_head" not in fp8.linears and model.lm_head.weight is before["lm_head.weight"]
    for path_, q in fp8.linears.items():
        w = model.get_submodule(path_).weight
        assert w is q.placeholder and w.dtype == torch.bfloat16 and w.stride() == (0, 0)
        assert w.untyped_storage().nbytes() == 2  # one element, whatever the shape
        assert torch.isnan(w).all()
    with pytest.raises(ValueError, match="already FP8-quantized"):
        quantize_model(model, QuantAlgo.FP8)
    assert "FP8 linears (per-channel)" in fp8.summary()


def test_tied_heads_stay_in_the_models_dtype(tmp_path):
    model = trtllm.load_model(write_checkpoint("qwen2", tmp_path), dtype=torch.float32, device="cpu",
                              quant_algo=QuantAlgo.FP8_BLOCK_SCALES)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    assert len(fp8_linears_of(model).linears) == 2 * 7


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # whole engines on the ops' references


@pytest.mark.parametrize("as_module", [False, True])
def test_llm_quant_config_quantizes_at_load_and_matches_the_fp8_reference(tmp_path, as_module):
    path = write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(path)
    algo = QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN
    model = trtllm.load_model(path, dtype=torch.float32, device="cpu") if as_module else str(path)
    with LLM(model, tokenizer=str(path), dtype="float32", quant_config=QuantConfig(quant_algo=algo),
             kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512),
             build_config=BuildConfig(max_batch_size=2, max_num_tokens=16, max_seq_len=64)) as llm:
        fp8 = fp8_linears_of(llm.compiled.module)
        assert fp8.source == f"QuantConfig(quant_algo={algo.value})" and len(fp8.linears) == 14
        prompts = [[5, 17, 99, 3, 250, 31, 8], list(range(60, 81))]
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        reference = trtllm.load_model(path, dtype=torch.float32, device="cpu")
        for name, q in fp8.linears.items():
            m = reference.get_submodule(name)
            m.weight = nn.Parameter(q.dequantized())
            m.register_forward_pre_hook(lambda m, a, q=q: (fake_quantize_input(a[0], q),))
        expected = []
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(6):
                with torch.no_grad():
                    ids = torch.cat([ids, reference(ids, torch.arange(ids.shape[1])[None])[:, -1:].argmax(-1)], 1)
            expected.append(ids[0, len(p):].tolist())
        assert got == expected


def test_an_hf_module_family_quantizes_and_one_without_linears_is_refused(tmp_path):
    """phi runs as transformers' module (models/hf.py): its nn.Linear layers quantize the same
    way; gpt2's projections are Conv1D, not nn.Linear: refused, not left unquantized."""
    phi = trtllm.load_model(write_checkpoint("phi", tmp_path / "phi"), dtype=torch.float32, device="cpu",
                            quant_algo=QuantAlgo.FP8)
    fp8 = fp8_linears_of(phi)
    assert len(fp8.linears) == 2 * 6 and not any("lm_head" in p for p in fp8.linears)  # q k v dense fc1 fc2
    reference = hf_model(tmp_path / "phi")  # the FP8 semantics in fp32
    for name, q in fp8.linears.items():
        m = reference.get_submodule(name)
        m.weight = nn.Parameter(q.dequantized())
        m.register_forward_pre_hook(lambda m, a, q=q: (fake_quantize_input(a[0], q),))
    ids = torch.tensor([[5, 17, 99, 3]])
    logits = trtllm.compile(phi)(ids, torch.arange(4)[None])
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize.*Conv1D"):
        trtllm.load_model(write_checkpoint("gpt2", tmp_path / "gpt2"), dtype=torch.float32, device="cpu",
                          quant_algo=QuantAlgo.FP8)
