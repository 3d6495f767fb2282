"""A LoRA adapter's identity in the engine: its lora_int_id keys its GPU slot, its host copy and its
prefix-cache blocks, so an id always means the same files; the fields of TensorRT-LLM's and vLLM's
LoRARequest."""
import pytest

from tests.lora_adapters import peft_greedy, write_adapter
from tests.runtime.test_lora import base, lora_llm  # noqa: F401 (fixtures)
from trtllm import LoRARequest, SamplingParams


def test_an_adapter_whose_files_change_under_its_id_is_refused(base, tmp_path):  # noqa: F811
    # its prefix blocks (and cached copies) are keyed by the id: re-read after an eviction, new
    # weights ran over KV computed with the old ones, neither adapter's tokens, silently
    prompt = list(range(100, 140))  # two full blocks before the last token
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    write_adapter(base, tmp_path / "a", r=4, seed=1)
    write_adapter(base, tmp_path / "b", r=4, seed=2)
    a, b = LoRARequest("a", 1, str(tmp_path / "a")), LoRARequest("b", 2, str(tmp_path / "b"))
    with lora_llm(base, max_loras=1, max_cpu_loras=1) as llm:
        llm.generate(prompt, params, lora_request=a)
        llm.generate(prompt, params, lora_request=b)  # a leaves the slot and the host cache
        new = write_adapter(base, tmp_path / "a", r=4, seed=7)
        with pytest.raises(ValueError, match=r"LoRA adapter 'a' \(.*\): its files changed since the engine first "
                                             r"read them as id 1; give the changed adapter an id of its own"):
            llm.generate(prompt, params, lora_request=a)
        assert not llm.has_unfinished()
        out = llm.generate(prompt, params, lora_request=LoRARequest("a", 3, str(tmp_path / "a")))
        assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == peft_greedy(new, prompt, 4)
        llm.block_manager.check_invariants()


def test_tensorrt_llm_and_vllm_spellings_of_lora_request(tmp_path):
    # TensorRT-LLM's lora_ckpt_source (its 4th field) and vLLM's lora_local_path, and both's
    # name / adapter_id / path properties (each was a TypeError or AttributeError)
    trt = LoRARequest("math", 3, str(tmp_path), "hf")
    assert (trt.name, trt.adapter_id, trt.path, trt.ckpt_source) == ("math", 3, str(tmp_path), "hf")
    vllm = LoRARequest(lora_name="math", lora_int_id=3, lora_local_path=str(tmp_path))
    assert vllm.lora_path == vllm.local_path == str(tmp_path) and vllm == trt
    with pytest.raises(ValueError, match="'math': lora_ckpt_source 'nemo' .*is not supported; only 'hf'"):
        LoRARequest("math", 3, str(tmp_path), lora_ckpt_source="nemo")
    with pytest.raises(ValueError, match="'math': lora_path .* and lora_local_path .* differ"):
        LoRARequest("math", 3, str(tmp_path), lora_local_path=str(tmp_path / "other"))


def test_lora_int_id_past_64_bits_is_refused_when_made(tmp_path):
    # TensorRT-LLM's task ids are uint64, and the prefix cache hashes the id in 8 bytes: 2**64 failed
    # inside the engine step ("internal error in the engine step: OverflowError")
    assert LoRARequest("big", 2**64 - 1, str(tmp_path)).lora_int_id == 2**64 - 1
    with pytest.raises(ValueError, match=r"lora_int_id must be an integer from 1 to 2\*\*64 - 1, got 18446744073709551616"):
        LoRARequest("big", 2**64, str(tmp_path))


def test_one_adapter_by_relative_and_absolute_paths_is_one_id(base, tmp_path, monkeypatch):  # noqa: F811
    # the same directory spelt two ways was refused as "needs an id of its own"
    peft_model = write_adapter(base, tmp_path / "a", r=4, seed=3)
    monkeypatch.chdir(tmp_path)
    want = peft_greedy(peft_model, [5, 6, 7], 4)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with lora_llm(base) as llm:
        for path in ("a", str(tmp_path / "a"), "./a/"):
            assert llm.generate([5, 6, 7], params, lora_request=LoRARequest("a", 1, path)).outputs[0].token_ids == want
        with pytest.raises(ValueError, match="needs an id of its own"):
            llm.generate([5, 6, 7], params, lora_request=LoRARequest("a", 1, str(base)))


def test_lora_config_takes_tensorrt_llm_lora_ckpt_source():
    # TensorRT-LLM's LoraConfig(lora_ckpt_source="hf") was "unknown option"
    from trtllm import LoraConfig
    assert LoraConfig(lora_ckpt_source="hf").lora_ckpt_source == "hf"
    with pytest.raises(ValueError, match=r"LoraConfig.lora_ckpt_source='nemo': only 'hf' \(PEFT adapter directories\)"):
        LoraConfig(lora_ckpt_source="nemo")


def test_checked_adapters_kept_are_bounded(base, tmp_path):  # noqa: F811
    # every adapter id's checked tensor names were kept for the engine's life (87 KB an id at Llama-8B's
    # 224 linears); now the last 64 (2 x max_cpu_loras past that), the ids' files for ever
    peft_model = write_adapter(base, tmp_path / "a", r=4, seed=3)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    with lora_llm(base, max_cpu_loras=2) as llm:
        for i in range(1, 101):
            llm.engine.check_lora(LoRARequest(f"a{i}", i, str(tmp_path / "a")))
        assert len(llm.engine.adapters._checked) == 64
        with pytest.raises(ValueError, match="id 1 is 'a1' .* needs an id of its own"):  # its files still known
            llm.engine.check_lora(LoRARequest("other", 1, str(base)))
        out = llm.generate([5, 6, 7], params, lora_request=LoRARequest("a1", 1, str(tmp_path / "a")))  # re-read
        assert out.outputs[0].token_ids == peft_greedy(peft_model, [5, 6, 7], 2)


def test_a_symlinked_adapter_repointed_to_the_same_files_is_the_same_adapter(base, tmp_path):  # noqa: F811
    # a deployment's `current -> v1` link moved to an identical copy (sizes and times kept): still id 1's
    # files; resolving the link made it "needs an id of its own"
    import os
    import shutil
    peft_model = write_adapter(base, tmp_path / "v1", r=4, seed=3)
    shutil.copytree(tmp_path / "v1", tmp_path / "v2")  # copy2: times kept
    os.symlink(tmp_path / "v1", tmp_path / "current")
    request = LoRARequest("a", 1, str(tmp_path / "current"))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with lora_llm(base) as llm:
        llm.generate([5, 6, 7], params, lora_request=request)
        os.unlink(tmp_path / "current")
        os.symlink(tmp_path / "v2", tmp_path / "current")
        out = llm.generate([5, 6, 7], params, lora_request=request)
        assert out.outputs[0].token_ids == peft_greedy(peft_model, [5, 6, 7], 4)
        write_adapter(base, tmp_path / "v2", r=4, seed=4)  # other weights: refused
        with pytest.raises(ValueError, match="its files changed since the engine first read them as id 1"):
            llm.generate([5, 6, 7], params, lora_request=request)


def test_another_projects_lora_request_is_named_by_its_module(base, tmp_path):  # noqa: F811
    # vLLM's or TensorRT-LLM's own class: "must be a LoRARequest, got LoRARequest" said nothing
    from dataclasses import dataclass

    @dataclass
    class LoRARequest:  # noqa: F811 (another project's, same name)
        lora_name: str
        lora_int_id: int
        lora_path: str

    with lora_llm(base) as llm:
        with pytest.raises(TypeError, match=r"lora_request must be a trtllm.LoRARequest, got tests\.runtime\."
                                            r"test_lora_identity\..*LoRARequest \(build one"):
            llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=LoRARequest("a", 1, str(tmp_path)))
