"""The package surface: public names load on first use; `import trtllm` and --help stay light."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("code", ["import trtllm", "import trtllm.cli.serve as s; s.parse_args(['--help'])",
                                  "import trtllm.cli.run as r; r.parse_args(['--help'])",
                                  "import trtllm.cli.bench as b; b.parse_args(['--help'])",
                                  "import trtllm.cli.bench as b; b.parse_args(['throughput', '--help'])"])
def test_no_torch_import_for_the_package_or_help(code):
    check = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_public_names_and_compile_is_the_function():
    import trtllm.runtime.llm  # binds trtllm; imports the submodule trtllm.compile too

    assert callable(trtllm.compile) and trtllm.compile.__name__ == "compile"
    for name in trtllm.__all__:
        assert getattr(trtllm, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trtllm.nope  # noqa: B018
