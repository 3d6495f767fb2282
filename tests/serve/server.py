"""Start `trtllm-serve` as a real subprocess on a tiny checkpoint, for the serve tests.

    write_model(directory) -> Path            tiny Llama checkpoint + byte-level tokenizer with a chat template
    with Server(model_dir, extra_args) as s:  s.url, s.get(...), s.post(...), s.metrics(), s.stop()

The server runs the ops' torch references (TRITON_INTERPRET=0), on a free local port;
startup waits on /health with a bounded loop, and every wait here has a deadline.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import CHATML_TEMPLATE, make_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
# One engine configuration for the server and the offline LLM it is compared with.
BUILD = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=64, max_beam_width=4)
KV_MAX_TOKENS = 4096
STARTUP_S = 120


def write_model(directory: Path) -> Path:
    write_checkpoint("llama31", directory, vocab_size=512)
    make_tokenizer(directory, chat_template=CHATML_TEMPLATE)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, *extra: str, log_path: Path, name: str = "tiny"):
        self.model_dir, self.extra, self.log_path, self.name = model_dir, list(extra), log_path, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false")
        args = [sys.executable, "-m", "trtllm.cli.serve", str(self.model_dir), "--port", str(self.port),
                "--dtype", "float32", "--served-model-name", self.name, "--kv_cache_max_tokens", str(KV_MAX_TOKENS),
                "--max_batch_size", str(BUILD["max_batch_size"]), "--max_num_tokens", str(BUILD["max_num_tokens"]),
                "--max_seq_len", str(BUILD["max_seq_len"]), "--max_beam_width", str(BUILD["max_beam_width"]),
                *self.extra]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        deadline = time.monotonic() + STARTUP_S
        for _ in range(STARTUP_S * 10):
            if self.proc.poll() is not None:
                raise RuntimeError(f"trtllm-serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"trtllm-serve did not become healthy in {STARTUP_S}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, json=None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=json, timeout=kw.pop("timeout", 60), **kw)

    def metrics(self, **kw) -> dict[str, float]:
        """The unlabelled and labelled samples of /metrics, by their full name."""
        text = self.get("/metrics", **kw).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, and the exit code (killed and -9 if it does not exit in `timeout`)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until truthy (returns its value); AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
