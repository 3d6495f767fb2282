import pytest

from tests.serve.server import Server, write_model


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("serve_model"))


@pytest.fixture(scope="package")
def server(model_dir, tmp_path_factory):
    """The shared server most tests drive (no API key)."""
    with Server(model_dir, log_path=tmp_path_factory.mktemp("serve_log") / "server.log") as s:
        yield s
    # after everything the package's tests threw at it, it still stops cleanly
    assert s.proc.returncode == 0, s.log()


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """In-process LLMs (the offline reference) run the ops' torch references, like the server."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
