"""trtllm-serve with --lora_modules, through the official `openai` client: adapters listed in
/v1/models, a request whose `model` is an adapter's name runs through it (its text equals the
offline LLM's with that adapter), an unknown name is a 404, /metrics counts requests per
adapter; a bad adapter path stops the server at startup, naming it."""
import subprocess
import sys

import openai
import pytest

from tests.lora_adapters import write_adapter
from tests.serve.server import BUILD, KV_MAX_TOKENS, REPO_ROOT, Server
from trtllm.config import BuildConfig, KvCacheConfig, LoraConfig
from trtllm.lora_request import LoRARequest
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPT = [5, 17, 99, 3, 250, 31, 8]


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_adapters")
    write_adapter(model_dir, root / "math", r=8, seed=11)
    write_adapter(model_dir, root / "code", r=4, targets=("q_proj", "v_proj", "down_proj"), seed=12)
    return {"math": root / "math", "code": root / "code"}


@pytest.fixture(scope="module")
def lora_server(model_dir, adapters, tmp_path_factory):
    modules = [f"{name}={path}" for name, path in adapters.items()]
    with Server(model_dir, "--lora_modules", *modules, "--max_loras", "1",
                log_path=tmp_path_factory.mktemp("lora_log") / "server.log") as s:
        yield s
    assert s.proc.returncode == 0, s.log()


def test_adapters_are_listed_routed_and_counted(lora_server, model_dir, adapters):
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny", "math", "code"]
    card = client.models.retrieve("math")
    assert card.id == "math" and card.model_extra["parent"] == "tiny"
    with pytest.raises(openai.NotFoundError, match="'tiny', 'math', 'code'"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=4)

    greedy = dict(max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
    served = {name: client.completions.create(model=name, prompt=PROMPT, **greedy) for name in ("tiny", "math",
                                                                                                 "code")}
    assert served["math"].model == "math"
    with LLM(str(model_dir), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16,
                                                                           max_tokens=KV_MAX_TOKENS),
             build_config=BuildConfig(**BUILD), lora_config=LoraConfig(max_lora_rank=8)) as llm:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        offline = {name: llm.generate(PROMPT, params, lora_request=None if name == "tiny" else LoRARequest(
            name, i, str(adapters[name]))).outputs[0].text for i, name in enumerate(served)}
    assert {name: out.choices[0].text for name, out in served.items()} == offline
    assert len(set(offline.values())) == 3  # each adapter changes the text: the check could fail

    chat = client.chat.completions.create(model="code", messages=[{"role": "user", "content": "Hi"}], **greedy)
    assert chat.model == "code" and chat.choices[0].message.content
    metrics = lora_server.metrics()
    assert metrics['trtllm_lora_requests_total{lora_name="math"}'] == 1
    assert metrics['trtllm_lora_requests_total{lora_name="code"}'] == 2


def test_a_bad_adapter_stops_the_server_at_startup_naming_it(model_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "trtllm.cli.serve", str(model_dir), "--port", "0", "--dtype",
                             "float32", "--kv_cache_max_tokens", "1024", "--lora_modules",
                             f"gone={tmp_path / 'missing'}"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                            env={"PYTHONPATH": str(REPO_ROOT), "TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert "'missing'" in result.stderr or "missing" in result.stderr
    assert "no such directory" in result.stderr, result.stderr[-2000:]


def test_a_crowd_over_adapters_in_one_slot(lora_server):
    """24 requests at once over the base and both adapters (one GPU slot: requests wait for it while the
    others run), on completions, chat and responses, whole and streamed, clients dropping, bad ones:
    each answered one equals itself sent alone, and the server ends holding no request and no block."""
    import random

    from tests.serve.test_concurrent_mix import check_crowd, make_request
    rng = random.Random(6)  # among them a streamed response of one token that decodes to "": its message
    reqs = [make_request(rng) for _ in range(24)]  # item must open and close with "" as the whole one has it
    for r in reqs:
        r["body"]["model"] = rng.choice(["tiny", "math", "code"])
    assert {r["body"]["model"] for r in reqs if r["kind"] == "ok"} == {"tiny", "math", "code"}
    check_crowd(lora_server, reqs, "temperature")
