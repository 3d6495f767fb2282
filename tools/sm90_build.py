"""What the sm_90 build checks share: tools/check_*_build.py compile kernels for sm_90 without
a GPU (tools/dump_sass.py's `compile_sm90`) and print one line a build; tests/kernels/test_*_build.py
run each such tool in its own process (the suite's kernels are interpreted ones, and a kernel
built for sm_90 needs `TRITON_INTERPRET=0` before Triton is imported).

    compiled = compile_or_report(name, kernel, args, num_warps, num_stages)  # in a tool; None: FAIL printed
    out = run_build_check("check_moe_build.py", timeout=300)                  # in a test: the tool's stdout

Importing this module imports neither Triton nor a kernel, so a test may import it.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_or_report(name: str, kernel, args: dict, num_warps: int, num_stages: int):
    """`kernel` compiled for sm_90 with `args`, or None after printing "FAIL <name>: <error>"
    (any build error is the finding)."""
    # here, not at the top: tools/dump_sass.py switches the interpreter off when imported
    from tools.dump_sass import compile_sm90
    try:
        return compile_sm90(kernel, args, num_warps, num_stages)
    except Exception as e:  # noqa: BLE001
        print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def run_build_check(script: str, timeout: int) -> str:
    """Run tools/<script> in its own process with the interpreter off; its stdout, once it has
    exited 0 (else an AssertionError carrying its output)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", script)],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout
