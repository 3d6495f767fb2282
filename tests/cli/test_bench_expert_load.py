"""trtllm-bench --expert_load on a model with no MoE block to count: refused by name (exit code
2, one line), never a run that reports no expert figures. A config naming no experts is refused
before anything loads; one that names experts but whose layers are all dense, once the warm-up
has compiled the graphs, before the timed run (without a warm-up, after it, before any figure)."""
import pytest

import trtllm.cli.model_arg as model_arg
import trtllm.runtime.llm as llm_module
from trtllm.cli.bench import main

FLAT = ["--batch_size", "2", "--input_len", "4", "--output_len", "3"]


def _refused(capsys, argv, words) -> None:
    assert main([*FLAT, "--expert_load", *argv]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"trtllm-bench: {words}" in err, err
    assert "tokens/s" not in out, out


@pytest.mark.parametrize("model", ["tiny-llama", "demo"])  # a preset, a checkpoint directory
def test_expert_load_on_a_model_without_experts_is_refused_before_it_loads(model, capsys, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("the model was loaded for --expert_load with no MoE layer to count")
    monkeypatch.setattr(llm_module, "LLM", built)
    monkeypatch.setattr(model_arg, "build_preset", built)
    _refused(capsys, ["--model", model], "--expert_load: the model has no MoE layers (its config names no experts: "
                                         "num_experts, num_local_experts, n_routed_experts)")


@pytest.mark.parametrize("warmup, calls_made", [("1", 1), ("0", 2)])  # no warm-up: stopped after the timed run
def test_expert_load_on_a_moe_config_of_dense_layers_only_is_refused(warmup, calls_made, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' torch references
    dense = dict(model_arg.PRESETS["tiny-qwen3-moe"], mlp_only_layers=[0, 1])  # experts named, none used
    monkeypatch.setitem(model_arg.PRESETS, "tiny-dense-moe", dense)
    real, calls = llm_module.LLM.generate_async, []

    def generate_async(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(llm_module.LLM, "generate_async", generate_async)
    report = tmp_path / "report.json"
    _refused(capsys, ["--model", "tiny-dense-moe", "--warmup", warmup, "--report_json", str(report)],
             "--expert_load: the model has no MoE layers")
    assert len(calls) == calls_made and not report.exists()  # a warm-up: the timed run never started
