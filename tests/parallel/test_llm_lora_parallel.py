"""LoRA under tensor and pipeline parallelism (CPU, gloo): every rank holds LoRA slots, rank 0
decides which adapter goes in which slot and each rank writes its part of it (B's rows of a
column-parallel linear, A's columns of a row-parallel one, its stage's layers); each step carries
every token's slot. A batch mixing the base and two adapters gives one rank's tokens, also with
fewer slots than adapters; an adapter is checked against the whole model at submission, and a
bad one is refused by name while the engine goes on."""
from __future__ import annotations

import shutil

import pytest

from tests.lora_adapters import write_adapter
from tests.parallel.test_llm_tensor_parallel import checkpoint
from trtllm import LLM, BuildConfig, KvCacheConfig, LoraConfig, LoRARequest, SamplingParams
from trtllm.runtime.outputs import RequestError

pytestmark = pytest.mark.usefixtures("reference_ops")

PROMPTS = [[5, 17, 99, 3, 250, 31, 8, 60, 61, 62, 63, 64, 65, 66], [400, 2], list(range(60, 74))]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    base = checkpoint("llama31", tmp_path_factory.mktemp("lora_tp"))
    adapters = []
    for i, (r, targets, options) in enumerate([(8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"), {"use_rslora": True}),
                                               (4, ("v_proj", "down_proj"), {})], start=1):
        path = tmp_path_factory.mktemp(f"adapter{i}")
        write_adapter(base, path, r=r, targets=targets, seed=i, **options)
        adapters.append(LoRARequest(f"adapter{i}", i, str(path)))
    return base, adapters


def lora_llm(path, max_loras: int = 2, **kwargs) -> LLM:
    # 8 tokens a step below a prompt's 14: chunked prefill
    return LLM(str(path), dtype="float32", device="cpu",
               kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=256),
               build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=32),
               lora_config=LoraConfig(max_lora_rank=8, max_loras=max_loras, max_cpu_loras=2), **kwargs)


def mixed(adapters):
    """Every prompt under the base and each adapter."""
    pairs = [(p, r) for p in PROMPTS for r in (None, *adapters)]
    return [p for p, _ in pairs], [r for _, r in pairs]


def tokens(llm, prompts, requests):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=requests)]


@pytest.fixture(scope="module")
def expected(base_and_adapters):
    base, adapters = base_and_adapters
    prompts, requests = mixed(adapters)
    with lora_llm(base) as llm:
        want = tokens(llm, prompts, requests)
    assert want[0] != want[1] and want[0] != want[2], "an adapter changes nothing: the test could not fail"
    return want


@pytest.mark.parametrize("sizes", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_a_mixed_batch_of_adapters_gives_one_ranks_tokens(base_and_adapters, expected, sizes):
    base, adapters = base_and_adapters
    prompts, requests = mixed(adapters)
    with lora_llm(base, **sizes) as llm:
        assert tokens(llm, prompts, requests) == expected
        slots = llm.compiled.lora  # rank 0's
        if "tensor_parallel_size" in sizes:  # its parts: B's rows of q_proj (2 of 4 heads), A's columns of down_proj
            assert slots.shards["model.layers.0.self_attn.q_proj"] == (0, ((0, 32),), 64)
            assert slots.shards["model.layers.1.mlp.down_proj"] == (1, ((0, 64),), 128)
        else:  # stage 0 wraps layer 0's linears; layer 1's are the other stage's
            assert {p.split(".")[2] for p in slots.modules} == {"0"}
            assert {p.split(".")[2] for p in slots.elsewhere} == {"1"}


def test_fewer_slots_than_adapters_reload_on_every_rank(base_and_adapters, expected):
    base, adapters = base_and_adapters
    prompts, requests = mixed(adapters)
    with lora_llm(base, max_loras=1, tensor_parallel_size=2) as llm:
        assert tokens(llm, prompts, requests) == expected
        assert llm.engine.adapters.slot_loads >= len(adapters)


def test_a_bad_adapter_is_refused_at_submission_and_the_engine_goes_on(base_and_adapters, expected, tmp_path):
    base, adapters = base_and_adapters
    wide = tmp_path / "rank16"
    write_adapter(base, wide, r=16, targets=("q_proj",))
    with lora_llm(base, pipeline_parallel_size=2) as llm:
        with pytest.raises(ValueError, match="rank r=16 exceeds max_lora_rank=8"):
            tokens(llm, PROMPTS[:1], LoRARequest("wide", 9, str(wide)))
        with pytest.raises(ValueError, match="no such directory"):
            tokens(llm, PROMPTS[:1], LoRARequest("gone", 10, str(tmp_path / "gone")))
        prompts, requests = mixed(adapters)
        assert tokens(llm, prompts, requests) == expected


def test_phi3_fused_projections_take_their_adapters_on_two_ranks(tmp_path):
    # an adapter on qkv_proj / gate_up_proj (B [q + k + v rows, r]): the projection splits into its parts,
    # each rank's B rows are its rows of each part, and the parts fused again make one adapter's linear
    from tests.lora_adapters import peft_greedy
    path = checkpoint("phi3", tmp_path)
    peft_model = write_adapter(path, tmp_path / "adapter", r=8, targets=("qkv_proj", "o_proj", "gate_up_proj",
                                                                         "down_proj"), seed=3)
    request = LoRARequest("fused", 1, str(tmp_path / "adapter"))
    want = [peft_greedy(peft_model, p, PARAMS.max_tokens) for p in PROMPTS]
    with lora_llm(path, tensor_parallel_size=2) as llm:
        assert tokens(llm, PROMPTS, request) == want
        # rank 0's rows of q (4 heads of 16), k and v (2 KV heads of 16) in the fused [128, 64] weight
        assert llm.compiled.lora.shards["model.layers.0.self_attn.qkv_proj"] == (0, ((0, 32), (64, 16), (96, 16)), 128)


def test_an_adapter_another_rank_cannot_read_fails_its_request_and_every_rank_goes_on(base_and_adapters, expected,
                                                                                      tmp_path):
    # rank 0 reads the adapter, then its files go away before rank 1 reads them: rank 1's loop ended
    # there (an unhandled error) and the engine failed with it; now the request fails naming the rank
    base, adapters = base_and_adapters
    path = tmp_path / "fleeting"
    write_adapter(base, path, r=4, targets=("q_proj",), seed=5)
    with lora_llm(base, max_loras=1, tensor_parallel_size=2) as llm:
        read = llm.engine.adapters.host_image

        def read_then_remove(request):
            image = read(request)
            if request.lora_name == "fleeting":
                shutil.rmtree(path, ignore_errors=True)
            return image
        llm.engine.adapters.host_image = read_then_remove
        with pytest.raises(RequestError, match=r"rank 1: LoRA adapter 'fleeting' .*no such directory"):
            tokens(llm, PROMPTS[:1], LoRARequest("fleeting", 7, str(path)))
        prompts, requests = mixed(adapters)
        assert tokens(llm, prompts, requests) == expected
        assert not llm.has_unfinished()
        llm.block_manager.check_invariants()
