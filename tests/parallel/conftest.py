import multiprocessing

import pytest


@pytest.fixture(autouse=True)
def no_process_left():
    """Every test here that starts ranks stops them: no child process outlives a test."""
    yield
    assert multiprocessing.active_children() == []


@pytest.fixture(scope="module")
def reference_ops():
    """Whole engines in every rank on the ops' torch references, as tests/runtime (opt-in:
    `pytestmark = pytest.mark.usefixtures("reference_ops")`; module-scoped, so a module's LLM
    fixtures built before its first test see it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


@pytest.fixture
def reference_ops_in_this_test(monkeypatch):
    """One test's ranks on the ops' torch references: a speculating engine on two ranks with
    the interpreted kernels took 70-120 s (the other tests of its module keep the kernels)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
