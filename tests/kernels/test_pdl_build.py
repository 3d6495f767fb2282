"""kernels/pdl.py: the decode step's PDL kernels as the H100/H200 gets them, compiled here for
sm_90 without a GPU (tools/check_pdl_build.py, in its own process): each waits for the kernel
before ahead of its first global load and lets the next launch; without the flag, neither.
The launch options are nothing off the GPU."""
import torch

from tools.sm90_build import run_build_check
from trtllm.kernels.pdl import pdl_options

# the bf16 and FP8 GEMVs, the quantizing GEMV (walking x for its amax, and taking partial amaxes),
# the two quantizations (dynamic, static), the two norms, rotary, the four SiLU·muls (plain,
# quantizing, quantizing by a static scale, storing partial amaxes); the MoE decode path's four
# (routing, gate/up, down, combine)
KERNELS = 17


def test_sm90_build():
    out = run_build_check("check_pdl_build.py", timeout=300)
    assert out.count("launch_dependents True") == KERNELS, out
    assert "FAIL" not in out, out


def test_no_pdl_off_the_gpu():
    assert pdl_options(torch.empty(1)) == {"PDL": False}


def test_turned_off_by_the_environment(monkeypatch):
    class Hopper:  # a stand-in for a tensor on an sm_90 GPU: the options on, then off by the switch
        is_cuda = True
        device = torch.device("cuda", 0)
    monkeypatch.setattr("trtllm.kernels.pdl._hopper_or_later", lambda index: True)
    monkeypatch.setattr("trtllm.kernels.pdl.triton_interpreter_on", lambda: False)
    assert pdl_options(Hopper()) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("TRTLLM_PDL", "0")
    assert pdl_options(Hopper()) == {"PDL": False}
