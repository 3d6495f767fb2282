"""A checkpoint directory's config.json: read with errors that name the file and the place, and
its sizes checked before any model is built from them."""
from __future__ import annotations

import json
from pathlib import Path


def read_config(path: Path) -> dict:
    """config.json of the checkpoint directory `path`, checked: a JSON object whose sizes are
    positive integers (ValueError / FileNotFoundError naming the file)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a HF checkpoint directory")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    check_config_sizes(config, config_file)
    return config


# config.json's sizes, under the names the families we load use (Llama's, BLOOM's / Falcon's, MPT's)
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "n_layer", "n_head", "n_layers",
               "n_heads", "d_model", "num_kv_heads")


def check_config_sizes(config: dict, config_file) -> None:
    """ValueError naming each size of config.json (and of its text_config) that is not a positive
    integer: a string or a negative number would otherwise fail deep in model construction."""
    bad = []
    for where, section in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(section, dict):
            continue
        for key in SIZE_FIELDS:
            value = section.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                bad.append(f"{where}{key}={value!r}")
    if bad:
        raise ValueError(f"{config_file}: {', '.join(bad)}: sizes must be positive integers")


def read_json(file: Path):
    """json.load, with errors that name the file and where in it the JSON breaks."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
