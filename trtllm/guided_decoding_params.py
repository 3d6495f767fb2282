"""`GuidedDecodingParams`: the one constraint a request's output must satisfy (structured output)."""
from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

from trtllm.config import ConfigError


@dataclass(kw_only=True)
class GuidedDecodingParams:
    """The one constraint a request's output must satisfy (TensorRT-LLM's `GuidedDecodingParams`,
    plus vLLM's `choice`): exactly one of

        json=schema          a JSON Schema (a dict, its JSON text, or a pydantic model class)
        json_object=True     any JSON object
        regex="..."          the whole output matches the regular expression
        grammar="..."        an EBNF grammar (GBNF, as llama.cpp writes it; root rule `root`)
        choice=["a", "b"]    the output is one of these strings
        structural_tag="..."  xgrammar's structural tag (JSON text)

    A dataclass, as TensorRT-LLM's is: it is checked here for its shape (one guide; JSON text
    that parses); whether the schema, regex or grammar compiles is checked when the request is
    submitted (runtime/grammar.py), a ValueError naming it."""
    json: Any = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    choice: list[str] | None = None
    structural_tag: str | None = None

    def __post_init__(self):
        problems = []
        if self.json is not None:
            if isinstance(self.json, type) and hasattr(self.json, "model_json_schema"):  # a pydantic model
                self.json = self.json.model_json_schema()
            elif isinstance(self.json, str):
                try:
                    self.json = _json.loads(self.json)
                except ValueError as e:
                    problems.append(("json", self.json, f"not valid JSON text: {e}"))
            if not problems and not isinstance(self.json, (dict, bool)):
                problems.append(("json", self.json, "must be a JSON Schema: a dict, its JSON text, or a pydantic "
                                 "model class"))
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                problems.append((name, value, "must be a non-empty string"))
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            problems.append(("choice", self.choice, "must be a non-empty list of non-empty strings"))
        given = [name for name in ("json", "regex", "grammar", "json_object", "choice", "structural_tag")
                 if getattr(self, name) not in (None, False)]
        if not problems and len(given) != 1:
            problems.append((None, None, f"exactly one guide must be given, got {len(given)}"
                             + (f" ({', '.join(given)})" if given else "")))
        if problems:
            raise ConfigError(type(self).__name__, problems)

    @property
    def kind(self) -> str:
        """Which guide: "json", "json_object", "regex", "grammar", "choice" or "structural_tag"."""
        return next(name for name in ("json", "regex", "grammar", "json_object", "choice", "structural_tag")
                    if getattr(self, name) not in (None, False))
