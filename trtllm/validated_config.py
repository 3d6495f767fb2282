"""What a user-facing config is: `ValidatedConfig`, a pydantic model validated when made and on
assignment, whose bad values raise `ConfigError` (a `ValueError`) with one line per bad field
naming the field, the value and the rule; unknown fields are refused by name, NaN and
infinities as not finite. `as_config` takes a config or a dict of its fields.

The configs themselves: config.py (TensorRT-LLM's), lora_config.py, sampling_params.py,
runtime/speculative/config.py. `ConfigError`'s public home is `trtllm.config` (and `trtllm`).
"""

from __future__ import annotations

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

    def __setattr__(self, name, value):
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise ConfigError.from_validation(type(self).__name__, e) from None


def as_config(name: str, value, cls):
    """`value` as a `cls` (a dict of its fields made into one; None stays None); TypeError otherwise."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} (or a dict of its fields), got {type(value).__name__}")
