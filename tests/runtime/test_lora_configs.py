"""adapter_config.json variants against PEFT's own reading of them (PeftModel.from_pretrained over
the tiny fp32 Llama of test_lora.py): a field PEFT defaults is read with PEFT's default; what the
engine cannot compute as PEFT does is refused at submission, by name."""
import json

import pytest
from peft import PeftModel

from tests.lora_adapters import peft_greedy, write_adapter
from tests.models.checkpoints import hf_model
from tests.runtime.test_lora import NEW, PROMPTS, base, greedy, llm  # noqa: F401 (fixtures)
from trtllm import LoRARequest, SamplingParams


def _edit_config(path, drop=(), **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    for key in drop:
        config.pop(key)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _adapter(base, path, lora_id, drop=(), r=4, **changes):  # noqa: F811
    write_adapter(base, path, r=r, seed=lora_id)
    _edit_config(path, drop, **changes)
    return LoRARequest(path.name, lora_id, str(path))


def _peft_tokens(base, path):  # noqa: F811
    model = PeftModel.from_pretrained(hf_model(base), str(path)).eval()
    return [peft_greedy(model, p, NEW) for p in PROMPTS[:2]]


def test_missing_r_and_lora_alpha_take_peft_defaults(llm, base, tmp_path):  # noqa: F811
    # peft's LoraConfig defaults r and lora_alpha to 8: a config without lora_alpha at r=4 scales by 2
    # (it was read as lora_alpha = r, scaling 1: other tokens, silently); one without r is r=8 (was refused)
    base_tokens = [peft_greedy(hf_model(base), p, NEW) for p in PROMPTS[:2]]
    for i, (r, drop) in enumerate([(4, ("lora_alpha",)), (8, ("r",)), (4, ("r", "lora_alpha"))]):
        if drop == ("r", "lora_alpha"):  # r=4 weights under the default r=8: refused by their shapes
            request = _adapter(base, tmp_path / "neither", 90 + i, drop, r=r)
            with pytest.raises(ValueError, match=r"'neither' .*lora_A must be \[8, 128\], lora_B \[64, 8\] \(adapter_config.json's r=8 is not the "
                                                 r"tensors' rank\)"):
                llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=request)
            continue
        request = _adapter(base, tmp_path / f"no_{drop[0]}", 90 + i, drop, r=r)
        want = _peft_tokens(base, tmp_path / f"no_{drop[0]}")
        assert want != base_tokens
        assert greedy(llm, PROMPTS[:2], request) == want, drop


def test_fan_in_fan_out_on_linear_targets_is_ignored_as_peft_ignores_it(llm, base, tmp_path):  # noqa: F811
    # PEFT warns and sets it False for nn.Linear targets; it was refused here
    request = _adapter(base, tmp_path / "fan", 70, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        want = _peft_tokens(base, tmp_path / "fan")
    with pytest.warns(UserWarning, match=r"'fan' .*fan_in_fan_out=True is ignored: the targeted modules are nn.Linear"):
        assert greedy(llm, PROMPTS[:2], request) == want


def test_inits_that_rewrite_the_base_weights_are_refused(llm, base, tmp_path):  # noqa: F811
    # PEFT loads a PiSSA / OLoRA / CorDA / LoftQ adapter (unconverted) over base weights it rewrites
    # first: served over the checkpoint's weights it gave other tokens than PEFT's, silently
    write_adapter(base, tmp_path / "pissa", r=4, seed=5, init_lora_weights="pissa")  # peft's own file
    want = _peft_tokens(base, tmp_path / "pissa")
    assert want != [peft_greedy(hf_model(base), p, NEW) for p in PROMPTS[:2]]
    with pytest.raises(ValueError, match=r"'pissa' .*init_lora_weights='pissa' is not supported: PEFT rewrites"):
        greedy(llm, PROMPTS[:2], LoRARequest("pissa", 80, str(tmp_path / "pissa")))
    for i, init in enumerate(["olora", "pissa_niter_4", "corda", "loftq"]):
        request = _adapter(base, tmp_path / init, 81 + i, init_lora_weights=init)
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}' is not supported"):
            llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=request)
    # inits of A and B alone change nothing at load: served
    request = _adapter(base, tmp_path / "gaussian", 85, init_lora_weights="gaussian")
    assert greedy(llm, PROMPTS[:2], request) == _peft_tokens(base, tmp_path / "gaussian")
    assert not llm.has_unfinished()


def test_a_config_without_target_modules_is_refused(llm, base, tmp_path):  # noqa: F811
    # PEFT then targets its table's modules for the model type (Llama: q_proj, v_proj) and drops the
    # file's other weights; the engine applied them all: other tokens than PEFT's, silently
    for i, edit in enumerate([dict(drop=("target_modules",)), dict(target_modules=None)]):
        request = _adapter(base, tmp_path / f"untargeted{i}", 86 + i, **edit)
        assert _peft_tokens(base, tmp_path / f"untargeted{i}") != [peft_greedy(hf_model(base), p, NEW)
                                                                   for p in PROMPTS[:2]]
        with pytest.raises(ValueError, match=r"'untargeted\d' .*adapter_config.json names no target_modules"):
            llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=request)


def test_tensors_named_without_peft_prefix_are_read(llm, base, tmp_path):  # noqa: F811
    # `model.layers.0....lora_A.weight` without peft's `base_model.model.` (other tools' files; vLLM
    # reads both): the same module paths (was refused as "no LoRA A or B weight")
    from safetensors.torch import load_file, save_file
    request = _adapter(base, tmp_path / "bare", 88)
    want = _peft_tokens(base, tmp_path / "bare")
    weights = tmp_path / "bare" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(weights))
    assert greedy(llm, PROMPTS[:2], request) == want
    twice = {**tensors, **{k.removeprefix("base_model.model."): v.clone() for k, v in tensors.items() if "q_proj" in k}}
    (tmp_path / "twice").mkdir()
    (tmp_path / "twice" / "adapter_config.json").write_bytes((tmp_path / "bare" / "adapter_config.json").read_bytes())
    save_file(twice, str(tmp_path / "twice" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"'twice' .*model.layers.0.self_attn.q_proj's lora_A is given twice"):
        llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=LoRARequest("twice", 89, str(tmp_path / "twice")))


def test_rank_and_alpha_patterns_are_honoured(llm, base, tmp_path):  # noqa: F811
    # per-module ranks and alphas by PEFT's rule (get_pattern_key: a pattern matches the module path's
    # end); they were refused
    for i, options in enumerate([dict(rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
                                      alpha_pattern={"v_proj": 3}),
                                 dict(rank_pattern={"o_proj": 2}, alpha_pattern={"gate_proj": 5}, use_rslora=True)]):
        peft_model = write_adapter(base, tmp_path / f"pattern{i}", r=8, seed=20 + i, **options)
        request = LoRARequest(f"pattern{i}", 95 + i, str(tmp_path / f"pattern{i}"))
        assert greedy(llm, PROMPTS[:2], request) == [peft_greedy(peft_model, p, NEW) for p in PROMPTS[:2]], options
    write_adapter(base, tmp_path / "big", r=8, seed=22, rank_pattern={"q_proj": 32})
    with pytest.raises(ValueError, match=r"'big' .*rank_pattern \{'q_proj': 32\}: rank 32 exceeds max_lora_rank=16"):
        llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=LoRARequest("big", 97, str(tmp_path / "big")))
    request = _adapter(base, tmp_path / "bad_re", 98, rank_pattern={"q_proj(": 2})
    with pytest.raises(ValueError, match=r"'bad_re' .*rank_pattern key 'q_proj\(' is not a regular expression"):
        llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=request)


def test_logits_overflowing_under_an_adapter_name_it(llm, base, tmp_path):  # noqa: F811
    # finite weights whose products overflow: the request fails naming its adapter (it said only "the
    # model produced NaN or Inf logits"); the base request beside it is served
    from safetensors.torch import load_file, save_file

    from trtllm.runtime.outputs import RequestError
    request = _adapter(base, tmp_path / "huge", 99)
    weights = tmp_path / "huge" / "adapter_model.safetensors"
    save_file({k: v * 1e37 for k, v in load_file(weights).items()}, str(weights))
    with pytest.raises(RequestError, match=r"prompt 0: .*NaN or Inf logits under LoRA adapter 'huge'") as e:
        greedy(llm, PROMPTS[:2], [request, None])
    assert e.value.outputs[1].outputs[0].token_ids == peft_greedy(hf_model(base), PROMPTS[1], NEW)
