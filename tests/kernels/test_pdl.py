"""Programmatic dependent launch (kernels/pdl.py): when it is on, that the launchers keep
it off where it cannot work, and the PDL ordering of the decode kernel (first context tile
before the wait) computes the same attention, run through the interpreter with the two
griddepcontrol instructions (inline asm, which the interpreter lacks) stubbed out.
The overlap itself, and CUDA-graph capture of PDL launches, only a GPU can show:
bench/bench_decode_pdl.py."""
import pytest
import torch

import trtllm.kernels.paged_attention_decode as pa_decode
import trtllm.kernels.rotary as rotary_mod
from trtllm.kernels import pdl
from tests.kernels.test_paged_attention import check, make_batch


def test_use_pdl_only_on_cuda_sm90_compiled(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "_capability_major", lambda index: 9)
    monkeypatch.setattr(pdl, "triton_interpreter_on", lambda: False)
    assert pdl.use_pdl(gpu, True)
    assert not pdl.use_pdl(gpu, False)
    assert not pdl.use_pdl(cpu, True)
    monkeypatch.setattr(pdl, "_capability_major", lambda index: 8)  # Ampere: no griddepcontrol
    assert not pdl.use_pdl(gpu, True)
    monkeypatch.setattr(pdl, "_capability_major", lambda index: 9)
    monkeypatch.setattr(pdl, "triton_interpreter_on", lambda: True)
    assert not pdl.use_pdl(gpu, True)


class _Spy:
    """Stands in for a @triton.jit kernel: records each launch's keywords, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _decode_args():
    args, _ = make_batch([(150, 1), (6, 1), (0, 1), (64, 1)], 8, 2, 32, 16, torch.float32,
                         pad_tokens=3, extra_seqs=1)
    return args


@pytest.mark.parametrize("module_flag", [False, True])
def test_decode_launcher_keeps_pdl_off_in_interpreter(monkeypatch, module_flag):
    """Asked for PDL (keyword or module flag), the interpreted launch still gets
    USE_PDL=False / launch_pdl=False (the inline asm would raise), and the same output."""
    monkeypatch.setattr(pa_decode, "_USE_PDL", module_flag)
    spy = _Spy(pa_decode._decode_kernel)
    monkeypatch.setattr(pa_decode, "_decode_kernel", spy)
    args = _decode_args()
    outs = {pdl_kw: check(args, decode_pdl=pdl_kw)[0] for pdl_kw in (None, False, True)}
    assert len(spy.launches) == 3
    assert all(kw["USE_PDL"] is False and kw["launch_pdl"] is False for kw in spy.launches)
    torch.testing.assert_close(outs[True], outs[False], atol=0, rtol=0)
    torch.testing.assert_close(outs[None], outs[False], atol=0, rtol=0)


class _Stub:
    """A griddepcontrol instruction, as plain Python (interpreted kernels call it)."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


@pytest.fixture
def pdl_in_interpreter(monkeypatch):
    """Decode launches with USE_PDL=True in the interpreter, the instructions stubbed."""
    wait, trigger = _Stub(), _Stub()
    monkeypatch.setattr(pa_decode, "pdl_ok", lambda device, wanted: wanted)
    monkeypatch.setattr(pa_decode, "_gdc_wait", wait)
    monkeypatch.setattr(pa_decode, "_gdc_launch_dependents", trigger)
    return wait, trigger


@pytest.mark.parametrize("splits,window,config", [
    (None, 0, None),  # the heuristic's splits (2) and config
    (1, 0, (16, 4, 1)),  # one split: the first tile is the only tile of short sequences
    (3, 0, (16, 4, 1)),  # uneven and empty splits (an empty split's first tile is all masked)
    (8, 40, (16, 4, 1)),  # sliding window: the first tile starts below lo
])
def test_decode_pdl_ordering_matches_reference(pdl_in_interpreter, splits, window, config):
    wait, trigger = pdl_in_interpreter
    args, _ = make_batch([(300, 1), (5, 1), (64, 1), (0, 1), (16, 1)], 8, 2, 32, 16,
                         torch.float32, window=window, pad_tokens=2, extra_seqs=1)
    out, _ = check(args, num_splits=splits, decode_config=config, decode_pdl=True)
    n_splits = splits or pa_decode._num_splits(args[12], 2, args[14], torch.device("cpu"))
    programs = 2 * args[12] * n_splits  # Hkv x num_seqs x splits: every program waits
    assert wait.calls == programs
    assert 0 < trigger.calls < programs  # not the unused row's programs (they return early)
    assert out[-2:].abs().sum() == 0  # padding rows, written after the wait
    assert not pa_decode._counters[torch.device("cpu")].any()  # merge tickets reset
    plain, _ = check(args, num_splits=splits, decode_config=config, decode_pdl=False)
    assert wait.calls == programs  # the plain launch never waits
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


def test_decode_pdl_ordering_fp16_seq_len_zero(pdl_in_interpreter):
    args, _ = make_batch([(20, 1), (3, 1), (47, 1)], 4, 2, 16, 16, torch.float16)
    a = list(args)
    a[8] = a[8].clone()
    a[8][1] = 0  # no context at all: the first tile and the new key are both skipped
    out, _ = check(tuple(a), decode_pdl=True)
    assert out[1].abs().sum() == 0 and out[0].abs().sum() > 0


def test_rotary_trigger_off_in_interpreter_and_harmless_on(monkeypatch):
    x = torch.randn(1, 4, 3, 16)
    cos, sin = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    ref = rotary_mod.rotary_ref(x, cos, sin, False)
    spy = _Spy(rotary_mod._rotary_kernel)
    monkeypatch.setattr(rotary_mod, "_rotary_kernel", spy)
    monkeypatch.setattr(rotary_mod, "_PDL_TRIGGER", True)
    torch.testing.assert_close(rotary_mod.rotary_triton(x, cos, sin, False), ref)
    assert spy.launches[-1]["PDL_TRIGGER"] is False
    # forced on (instruction stubbed): every program triggers, the output is unchanged
    trigger = _Stub()
    monkeypatch.setattr(rotary_mod, "_pdl_ok", lambda device, wanted: wanted)
    monkeypatch.setattr(rotary_mod, "_gdc_launch_dependents", trigger)
    torch.testing.assert_close(rotary_mod.rotary_triton(x, cos, sin, False), ref)
    assert spy.launches[-1]["PDL_TRIGGER"] is True and trigger.calls == 3  # B * S programs
