"""What a new user's `pip install -e ".[test]"` resolves, in a new virtual environment.

Opt-in (minutes, and it reads the package index): `python -m pytest -m fresh_venv
tests/test_install.py`. It builds a venv with the CPU torch .ci/constraints.txt names, installs
the project with its test extras as the README says, and runs the tests that broke on an
unpinned install (tests/serve/test_fuzz.py under pytest 9.2) inside it.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd, cwd=ROOT, timeout=1800):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.fresh_venv
def test_pinned_extras_install_and_run_in_a_new_venv(tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    _run(py, "-m", "pip", "install", "-q", "-c", ".ci/constraints.txt", "torch==2.13.0")
    _run(py, "-m", "pip", "install", "-q", "-c", ".ci/constraints.txt", "-e", ".[test]")
    versions = _run(py, "-c", "import pytest, schemathesis; print(pytest.__version__)")
    major, minor = map(int, versions.split(".")[:2])
    assert (major, minor) < (9, 2), f"pyproject's pin let pytest {versions.strip()} in"
    _run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/serve/test_fuzz.py", "tests/test_config.py")
