"""registry.interpreter_upcast: what a kernel launch gets under the Triton interpreter
(fp32 copies of bf16 tensors, written ones rounded back) and on the compiled path (the
tensors themselves)."""
import torch

from trtllm.kernels.registry import interpreter_upcast

ULP_AT_1 = 2.0 ** -7  # bf16 keeps 7 fraction bits


def test_compiled_path_gets_the_tensors_themselves(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, out = torch.randn(4, dtype=torch.bfloat16), torch.empty(4, dtype=torch.bfloat16)
    with interpreter_upcast((x, None), (out,)) as ((x_in, none), (out_in,)):
        assert x_in is x and none is None and out_in is out


def test_interpreter_gets_fp32_copies_of_bf16_only():
    x, h, i = torch.randn(4, dtype=torch.bfloat16), torch.randn(4, dtype=torch.float16), torch.arange(4)
    with interpreter_upcast((x, h, i, None)) as ((x_in, h_in, i_in, none), ()):
        assert x_in.dtype == torch.float32 and torch.equal(x_in, x.float())
        assert h_in is h and i_in is i and none is None


def test_writes_are_rounded_to_nearest_and_untouched_entries_kept():
    """A kernel writing a few rows of a whole (KV cache) copy changes nothing else."""
    cache = torch.randn(3, 5, dtype=torch.bfloat16)
    cache[2, 4] = float("nan")
    before = cache.clone()
    with interpreter_upcast((), (cache,)) as ((), (copy,)):
        copy[1] = 1 + 0.75 * ULP_AT_1  # truncation would give 1, round-to-nearest 1 + ulp
    assert (cache[1] == 1 + ULP_AT_1).all()
    torch.testing.assert_close(cache[[0, 2]], before[[0, 2]], atol=0, rtol=0, equal_nan=True)


def test_a_tensor_passed_twice_gets_one_copy():
    # rms_norm without a residual passes x as the residual and out as the sum's output
    x, out = torch.randn(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)
    with interpreter_upcast((x, x), (out, out)) as ((a, b), (o1, o2)):
        assert a is b and o1 is o2
        o1.copy_(a * 2)
    assert torch.equal(out, x * 2)


def test_fp8_gets_an_fp32_copy_and_writes_round_to_nearest():
    x = torch.randn(8).to(torch.float8_e4m3fn)
    out = torch.zeros(3, dtype=torch.float8_e4m3fn)
    with interpreter_upcast((x,), (out,)) as ((x_in,), (out_in,)):
        assert x_in.dtype == torch.float32 and torch.equal(x_in, x.float())
        out_in[:] = torch.tensor([1.0 + 0.09, 27.3, -300.0])  # e4m3 steps: 0.125 at 1, 2 at 16-32
    assert out.float().tolist() == [1.125, 28.0, -288.0]
