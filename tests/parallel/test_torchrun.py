"""Two "nodes" on one machine: two torchrun launches (--nnodes 2 --nproc_per_node 1, one c10d
rendezvous endpoint) of the same program, a pipeline of two stages across them, give the greedy
tokens of one rank."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.test_llm_pipeline_parallel import checkpoint
from trtllm import LLM, SamplingParams
from trtllm.config import BuildConfig, KvCacheConfig

SCRIPT = Path(__file__).with_name("torchrun_llm.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun agents, two ranks compiling, and one rank for the reference: ~80 s here
def test_two_torchrun_nodes_give_one_ranks_tokens(tmp_path):
    from tests.parallel.torchrun_llm import PROMPTS
    path = checkpoint("llama31", tmp_path)
    out = tmp_path / "tokens.json"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", "trtllm-test", str(SCRIPT), str(path), str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path) for node in (0, 1)]
    logs = []
    try:
        for p in launches:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in launches:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in launches] == [0, 0], "\n".join(logs)[-6000:]
    got = json.loads(out.read_text())
    assert got["rank"] == 0
    with LLM(str(path), dtype="float32", device="cpu", kv_cache_config=KvCacheConfig(tokens_per_block=16,
             max_tokens=256), build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=32)) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(
            PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)]
    assert got["tokens"] == expected
