"""What a user-facing config is: `ValidatedConfig`, a pydantic model validated when made and on
assignment, whose bad values raise `ConfigError` (a `ValueError`) with one line per bad field
naming the field, the value and the rule; unknown fields are refused by name, NaN and
infinities as not finite, a bool given for a number (or a number or string for a bool: pydantic's
lax mode took True as 1 and "yes" as True) as the mistake it is. `as_config` takes a config or a
dict of its fields.

The configs themselves: config.py (TensorRT-LLM's), lora_config.py, sampling_params.py,
runtime/speculative/config.py. `ConfigError`'s public home is `trtllm.config` (and `trtllm`).
"""

from __future__ import annotations

import functools
from typing import Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """Bad options for a config: `problems` holds (field, value, rule) per bad field,
    field None for a rule across fields; str() is one line per problem."""

    NOT_GIVEN = object()  # a problem's value for a required field left out: no value to show

    def __init__(self, config: str, problems: list[tuple[str | None, object, str]]):
        self.config, self.problems = config, problems
        lines = [f"{config}: {rule}" if field is None
                 else f"{config}.{field}: {rule}" if value is self.NOT_GIVEN
                 else f"{config}.{field}={value!r}: {rule}"
                 for field, value, rule in problems]
        super().__init__("\n".join(lines))

    @classmethod
    def from_validation(cls, config: str, error: ValidationError) -> ConfigError:
        problems = []
        for e in error.errors(include_url=False):
            field = ".".join(str(p) for p in e.get("loc", ())) or None
            rule = e["msg"].removeprefix("Value error, ").replace("Input should be", "must be", 1)
            if e["type"] == "extra_forbidden":
                rule = "unknown option"
            elif e["type"] == "finite_number":
                rule = "must be a finite number"
            elif e["type"] == "missing":  # its input is the whole config's: not this field's value
                problems.append((field, cls.NOT_GIVEN, "required"))
                continue
            problems.append((field, e.get("input") if field else None, rule))
        return cls(config, problems)


class ValidatedConfig(BaseModel):
    """A pydantic model whose validation errors (when made or assigned) are ConfigErrors:
    a user reads one line per bad field, not pydantic's dump with documentation links."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError.from_validation(type(self).__name__, e) from None
        _check_bools_and_numbers(type(self), data)  # (after: a field's own rule speaks first)

    def __setattr__(self, name, value):
        _check_bools_and_numbers(type(self), {name: value})
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise ConfigError.from_validation(type(self).__name__, e) from None


def _check_bools_and_numbers(cls, data: dict) -> None:
    """pydantic's lax mode reads True as 1 (or 1.0) and 1, "yes" or "on" as True: a flag given
    where a number belongs, or the reverse, is a mistake to name, not a value to guess."""
    numbers, bools = _number_and_bool_fields(cls)
    problems = [(name, value, "must be a number, not a bool") if name in numbers
                else (name, value, "must be True or False")
                for name, value in data.items()
                if (name in numbers and isinstance(value, bool))
                or (name in bools and isinstance(value, (int, float, str)) and not isinstance(value, bool))]
    if problems:
        raise ConfigError(cls.__name__, problems)


@functools.cache
def _number_and_bool_fields(cls) -> tuple[frozenset[str], frozenset[str]]:
    """A config's fields that take a number and no bool, and those that take a bool alone (None aside)."""
    kinds = {name: _field_types(f.annotation) for name, f in cls.model_fields.items()}
    return (frozenset(n for n, k in kinds.items() if k & {int, float} and bool not in k),
            frozenset(n for n, k in kinds.items() if k == {bool}))


def _field_types(annotation) -> set:
    """A field's annotation as the set of its Union members, None left out (`bool | None` -> {bool})."""
    members = get_args(annotation) if get_origin(annotation) in (Union, type(int | None)) else (annotation,)
    return set(members) - {type(None)}


def as_config(name: str, value, cls):
    """`value` as a `cls` (a dict of its fields made into one; None stays None); TypeError otherwise."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} (or a dict of its fields), got {type(value).__name__}")
