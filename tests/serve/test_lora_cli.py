"""trtllm-serve's --lora_modules read before any model loads: a name that is also the served model's
(its requests would never reach the adapter) is a bad option; the default max_lora_rank counts an
adapter without `r` at PEFT's default."""
import json

import pytest

import trtllm.cli.serve as cli
from trtllm.cli.serve import main


def test_an_adapter_named_as_the_served_model_is_a_bad_option(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    for argv in (["--served-model-name", "tiny"], [str(tmp_path / "m"), "--served-model-name", "tiny"]):
        assert main(["--port", "0", *argv, "--lora_modules", f"tiny={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert "--lora_modules 'tiny': the served model's name; requests naming it get the base model" in err, err
    assert main(["--port", "0", "--lora_modules", f"trtllm-demo={tmp_path}"]) == 2  # the demo model's name
    assert "--lora_modules 'trtllm-demo': the served model's name" in capsys.readouterr().err


def test_the_default_rank_counts_an_adapter_without_r_at_peft_default(tmp_path):
    for name, config in (("small", {"r": 4}), ("plain", {})):  # PEFT reads the second as r=8
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    args = cli.parse_args(["m", "--lora_modules", f"small={tmp_path / 'small'}", f"plain={tmp_path / 'plain'}"])
    assert cli.engine_options(args)["lora_config"].max_lora_rank == 8


def test_lora_modules_take_vllm_json_form(tmp_path):
    # vLLM's '{"name": ..., "path": ..., "base_model_name": ...}' (was "expected NAME=PATH")
    spec = json.dumps({"name": "sql", "path": str(tmp_path), "base_model_name": "tiny"})
    modules = cli.parse_lora_modules([spec, f"math={tmp_path}"], "tiny")
    assert [(m.lora_name, m.lora_int_id, m.lora_path) for m in modules.values()] == [("sql", 1, str(tmp_path)),
                                                                                     ("math", 2, str(tmp_path))]
    for bad, why in [({"name": "sql"}, "'path' must be a non-empty string"),
                     ({"name": "sql", "path": "p", "base_model_name": "other"}, "base_model_name 'other' is not the "
                                                                                "served model 'tiny'"),
                     ({"name": "sql", "path": "p", "rank": 8}, "unknown key 'rank'")]:
        with pytest.raises(ValueError, match=why):
            cli.parse_lora_modules([json.dumps(bad)], "tiny")
    with pytest.raises(ValueError, match="not a JSON object"):
        cli.parse_lora_modules(['{"name": "sql",'], "tiny")
