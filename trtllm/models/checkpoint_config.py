"""A checkpoint directory's config.json: read with errors that name the file and the place, and
its sizes checked before any model is built from them."""
from __future__ import annotations

import json
import math
from pathlib import Path

# Files any one of which makes a directory loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            check_expert_counts(section, config_file)
            check_config_numbers(section, config_file)
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


# rope parameters that divide or scale the frequencies: 0 or a negative one makes inf or NaN rotations
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# numbers whose 0 or negative value makes no model: Gemma's softmax scale (query_pre_attn_scalar ** -0.5:
# a ZeroDivisionError or a complex scale), MPT's / OLMoE's clamp of q, k, v (a negative one clamped
# every value to it, silently)
POSITIVE_FIELDS = ("query_pre_attn_scalar", "clip_qkv")
# switches our model files read with bool(): the string "false" would turn each on, silently
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias", "norm_topk_prob", "use_sliding_window",
               "bias", "parallel_attn", "new_decoder_architecture", "multi_query", "alibi",
               "apply_residual_connection_post_layernorm", "multimodal_projector_bias")
EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")


def check_config_numbers(config: dict, config_file) -> None:
    """ValueError naming a norm epsilon that is not a finite number >= 0 (a negative one made NaN
    logits silently; a string failed inside the first norm), a rope_theta or rope scaling number
    that is not a finite positive number, or llama3 rope factors low >= high (inf or NaN rotations,
    silently), a BOOL_FIELDS switch that is not a boolean, a negative sliding_window (taken as a
    window by Mistral's rule), POSITIVE_FIELDS not above 0, or a partial_rotary_factor outside
    (0, 1] (rotating more channels than a head has)."""
    bad = [f"{key}={config[key]!r} (a norm epsilon: a number >= 0)" for key in EPS_FIELDS
           if config.get(key) is not None and not _is_number(config[key], 0.0)]
    rope = [("", config)] + [(f"{key}.", config[key]) for key in ("rope_parameters", "rope_scaling")
                             if isinstance(config.get(key), dict)]
    bad += [f"{key}={config[key]!r} (an object of rope parameters: rope_type, factor, ...)"
            for key in ("rope_parameters", "rope_scaling") if config.get(key) and not isinstance(config[key], dict)]
    bad += [f"{where}{key}={section[key]!r} (a number > 0)" for where, section in rope for key in ROPE_NUMBERS
            if section.get(key) is not None and not _is_number(section[key], 0.0, strict=True)]
    bad += [f"{where}low_freq_factor={section['low_freq_factor']!r} >= high_freq_factor="
            f"{section['high_freq_factor']!r} (llama3 rope blends between them: low < high)"
            for where, section in rope if section.get("rope_type", section.get("type")) == "llama3"
            and _is_number(section.get("low_freq_factor"), 0.0) and _is_number(section.get("high_freq_factor"), 0.0)
            and section["low_freq_factor"] >= section["high_freq_factor"]]
    for where, section in (("", config), ("attn_config.", config.get("attn_config"))):  # MPT nests its own
        bad += [f"{where}{key}={section[key]!r} (a number > 0, or null)" for key in POSITIVE_FIELDS
                if isinstance(section, dict) and section.get(key) is not None
                and not _is_number(section[key], 0.0, strict=True)]
    partial = config.get("partial_rotary_factor")
    if partial is not None and not (_is_number(partial, 0.0, strict=True) and partial <= 1):
        bad.append(f"partial_rotary_factor={partial!r} (the rotated share of a head: above 0, at most 1)")
    bad += [f"{key}={config[key]!r} (true or false)" for key in BOOL_FIELDS
            if config.get(key) is not None and not (isinstance(config[key], bool) or config[key] in (0, 1))]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if config.get("head_dim") is None and _is_int(hidden) and _is_int(heads) and heads and hidden % heads:
        bad.append(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads} and no head_dim is given "
                   "(a head is hidden_size / heads wide)")
    window = config.get("sliding_window")
    if window is not None and not isinstance(window, bool) and not (isinstance(window, int) and window >= 0):
        bad.append(f"sliding_window={window!r} (a number of tokens >= 0, or null)")
    if bad:
        raise ValueError(f"{config_file}: {', '.join(bad)}")


def _is_number(value, low: float, strict: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > low if strict else value >= low))


# the experts' count under the names the MoE families use (Qwen-MoE / OLMoE, Mixtral, DeepSeek)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def check_expert_counts(config: dict, config_file) -> None:
    """ValueError naming a MoE config whose routing cannot pick its experts: top-k of
    `num_experts_per_tok` must be 1..experts (0 would leave the experts out of every layer
    silently, more fails in torch.topk at the first token), and DeepSeek's groups must split the
    experts evenly with top-k no more than the chosen groups hold (HF's module would route to
    experts of groups it masked out)."""
    field, experts = next(((k, config[k]) for k in EXPERT_COUNT_FIELDS if config.get(k) is not None), (None, None))
    if experts is None:
        return
    if not _is_int(experts):
        raise ValueError(f"{config_file}: {field}={experts!r}: the number of experts must be an integer")
    if experts == 0:
        return  # a dense model (Qwen-MoE's num_experts 0 turns its MoE layers off)
    top_k = config.get("num_experts_per_tok")
    if top_k is not None and not (_is_int(top_k) and 1 <= top_k <= experts):
        raise ValueError(f"{config_file}: num_experts_per_tok={top_k!r}: each token's experts must be an integer "
                         f"from 1 to the {experts} experts")
    groups, chosen = config.get("n_group"), config.get("topk_group")
    if groups is None or chosen is None or config.get("topk_method") == "greedy":
        return  # no groups (DeepSeek-V2's greedy routing ignores them)
    if not (_is_int(groups) and groups >= 1 and experts % groups == 0):
        raise ValueError(f"{config_file}: n_group={groups!r} does not split the {experts} experts into equal groups")
    if not (_is_int(chosen) and 1 <= chosen <= groups):
        raise ValueError(f"{config_file}: topk_group={chosen!r}: the groups chosen per token must be 1 to "
                         f"n_group={groups}")
    if top_k is not None and top_k > chosen * experts // groups:
        raise ValueError(f"{config_file}: num_experts_per_tok={top_k} is more than the {chosen * experts // groups} "
                         f"experts of the topk_group={chosen} groups chosen per token")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_json(file: Path):
    """json.load, with errors that name the file and where in it the JSON breaks."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
