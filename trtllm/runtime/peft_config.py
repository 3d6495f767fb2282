"""A PEFT LoRA adapter's adapter_config.json, checked: its rank and scaling, by PEFT's rules.

`check_peft_config(config, name, max_lora_rank)` -> its ranks and scalings (`PeftRanks`, per module:
rank_pattern / alpha_pattern honoured); a ValueError naming the
adapter and the field for whatever would make the engine compute something other than what
PEFT's model with the adapter computes (and the engine cannot do). `left_out_by_config(config,
path)`: which of the config's module selectors leaves a module out.

PEFT is the reference: a field PEFT reads with a default (`r`, `lora_alpha`: 8 each, peft's
LoraConfig) takes PEFT's default when it is missing.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

# peft.LoraConfig's defaults: PEFT loads an adapter_config.json without `r` or `lora_alpha` with them
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_LORA_ALPHA = 8
# config entries that change what a LoRA computes, refused unless at their no-op value
_REFUSED_OPTIONS = {
    "use_dora": (False, "DoRA (use_dora)"),
    "lora_bias": (False, "LoRA bias (lora_bias)"),
    "use_qalora": (False, "QA-LoRA (use_qalora)"),
}
# init_lora_weights that rewrite the base model's weights when PEFT loads the adapter (the
# adapter was trained over the rewritten weights: PiSSA / OLoRA / CorDA subtract a part of each
# weight, LoftQ quantizes it). The engine keeps the base weights as the checkpoint has them.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def check_peft_config(config: dict, name: str, max_lora_rank: int) -> PeftRanks:
    """The ranks and scalings of the adapter `name` whose adapter_config.json is `config` (ValueError
    naming what the engine cannot do)."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{name}: peft_type {peft_type!r} is not supported (LoRA only)")
    for option, (ok, what) in _REFUSED_OPTIONS.items():
        if config.get(option, ok) not in (ok, None):
            raise ValueError(f"{name}: {what} is not supported")
    if config.get("fan_in_fan_out"):  # for Conv1D (GPT-2's) weights; every target here is an nn.Linear
        warnings.warn(f"{name}: fan_in_fan_out=True is ignored: the targeted modules are nn.Linear (PEFT sets it "
                      "to False for them too)", stacklevel=2)
    if config.get("bias", "none") != "none":
        raise ValueError(f"{name}: bias={config['bias']!r} (trained biases) is not supported; only bias='none'")
    if config.get("modules_to_save"):
        raise ValueError(f"{name}: modules_to_save {config['modules_to_save']} (fully trained modules) "
                         "is not supported")
    if config.get("layer_replication"):
        raise ValueError(f"{name}: layer_replication is not supported")
    if not config.get("target_modules"):  # PEFT would fill them in from its table of model types
        raise ValueError(f"{name}: adapter_config.json names no target_modules: PEFT would target its default "
                         "modules for the model type (Llama's: q_proj, v_proj) and leave the file's other weights "
                         "out; give the modules the adapter was trained on")
    _check_init(config, name)
    return _ranks(config, name, max_lora_rank)


def _check_init(config: dict, name: str) -> None:
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(f"{name}: init_lora_weights={init!r} is not supported: PEFT rewrites the base model's "
                         "weights when it loads such an adapter, and the engine keeps the checkpoint's (convert it "
                         "to a plain LoRA adapter: peft's save_pretrained(path_initial_model_for_weight_conversion=...))")


@dataclass(frozen=True)
class PeftRanks:
    """An adapter's rank and scaling per module: r and lora_alpha, or rank_pattern's / alpha_pattern's
    value for a module a pattern names (PEFT's get_pattern_key: the first pattern matching the
    module path's end)."""
    r: int
    alpha: float
    rslora: bool
    rank_pattern: dict
    alpha_pattern: dict

    def rank(self, path: str) -> int:
        return _by_pattern(self.rank_pattern, path, self.r)

    def scaling(self, path: str) -> float:
        r, alpha = self.rank(path), _by_pattern(self.alpha_pattern, path, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])


def _by_pattern(pattern: dict, path: str, default):
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", path)), None)
    return default if key is None else pattern[key]


def _ranks(config: dict, name: str, max_lora_rank: int) -> PeftRanks:
    rank, alpha = config.get("r", PEFT_DEFAULT_R), config.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA)
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{name}: r={rank!r}, lora_alpha={alpha!r}: r must be a positive integer, "
                         "lora_alpha a number")
    if rank > max_lora_rank:
        raise ValueError(f"{name}: rank r={rank} exceeds max_lora_rank={max_lora_rank}")
    patterns = {}
    for field, ok in (("rank_pattern", lambda v: isinstance(v, int) and 1 <= v), ("alpha_pattern",
                      lambda v: isinstance(v, (int, float)))):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and ok(v) for k, v in pattern.items()):
            raise ValueError(f"{name}: {field} {pattern!r} must map module patterns to "
                             f"{'positive integer ranks' if field == 'rank_pattern' else 'numbers'}")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{name}: {field} key {key!r} is not a regular expression: {e}") from None
        patterns[field] = pattern
    too_big = max(patterns["rank_pattern"].values(), default=0)
    if too_big > max_lora_rank:
        raise ValueError(f"{name}: rank_pattern {patterns['rank_pattern']}: rank {too_big} exceeds "
                         f"max_lora_rank={max_lora_rank}")
    return PeftRanks(rank, alpha, bool(config.get("use_rslora")), patterns["rank_pattern"], patterns["alpha_pattern"])


def left_out_by_config(config: dict, path: str) -> str | None:
    """Which of the config's module selectors leaves out the module at `path` (None: PEFT
    targets it), by PEFT's rule (tuners_utils.check_target_module_exists): target_modules a
    regular expression matched whole, or names matched whole or as the path's last parts;
    layers_to_transform the index after `layers_pattern` (else after any part) in the path;
    exclude_modules the same way as target_modules."""
    def selects(spec, key: str) -> bool:
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, key) is not None
        return key in spec or any(key.endswith(f".{t}") for t in spec)

    targets = config.get("target_modules")
    if targets and not selects(targets, path):
        return f"target_modules {targets!r}"
    excluded = config.get("exclude_modules")
    if excluded and selects(excluded, path):
        return f"exclude_modules {excluded!r}"
    layers = config.get("layers_to_transform")
    if layers is None or layers == [] or isinstance(targets, str):
        return None
    patterns = config.get("layers_pattern") or [r"[^.]*"]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    index = next((m for p in patterns if (m := re.match(rf".*\.{p}\.(\d+)\.", path)) is not None), None)
    if index is None or int(index.group(1)) not in ([layers] if isinstance(layers, int) else layers):
        return f"layers_to_transform {layers!r}"
    return None
