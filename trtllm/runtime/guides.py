"""Guides (`SamplingParams.guided_decoding`) as xgrammar grammars: checked at submission,
keyed for the engine's compile cache, and xgrammar 0.2.9's JSON quirks worked around.
runtime/grammar.py compiles them against the vocabulary and applies them each step.

    check_guide(guide)          # the guide's EBNF text (no tokenizer), or a ValueError naming it
    guide_key(guide)            # (kind, canonical text): equal guides share one compiled grammar
    validate_guided(params, has_tokenizer)   # engine_limits' check before any work
    json_safe_words(...)        # the bitmask that keeps raw control characters out of JSON rows

xgrammar is optional (`pip install 'trtllm[guided]'`): `xgrammar_module()` raises a
ValueError naming the missing package.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict

import torch

from trtllm.guided_decoding_params import GuidedDecodingParams
from trtllm.sampling_params import SamplingParams

_PARSED_CACHE = 256      # tokenizer-free grammars kept (check_guide), process-wide
# JSON containers nested in a JSON Schema at most: the meta-schema check and pickling (to the
# engine process) recurse on each, and ~100 nested subschemas exhaust Python's stack (OpenAI's
# structured outputs take 10 levels of nesting)
MAX_SCHEMA_DEPTH = 64
XGRAMMAR_MISSING = ("guided_decoding needs the xgrammar package, which is not installed "
                     "(pip install 'trtllm[guided]')")


def xgrammar_module():
    try:
        import xgrammar
    except ImportError:
        raise ValueError(XGRAMMAR_MISSING) from None
    return xgrammar


def guide_key(guide: GuidedDecodingParams) -> tuple[str, str]:
    """(kind, canonical text): equal guides share one compiled grammar. JSON keeps its key
    order (a schema's property order is the output's)."""
    kind = guide.kind
    if kind == "json":
        return kind, json.dumps(guide.json, ensure_ascii=False, separators=(",", ":"))
    if kind == "json_object":
        return kind, ""
    if kind == "choice":
        return kind, json.dumps(list(guide.choice), ensure_ascii=False)
    return kind, getattr(guide, kind)


_parsed: OrderedDict[tuple[str, str], str] = OrderedDict()


def check_guide(guide: GuidedDecodingParams) -> str:
    """The guide as the EBNF text of an xgrammar grammar (no tokenizer needed), cached by its
    key; a ValueError naming the guide and what is wrong with it if it does not parse.

    Text, not xgrammar's `Grammar`: xgrammar 0.2.9 prints a code point below 256 as `\\xHH`
    and reads `\\x` greedily, so a `Grammar` (which it prints to compile) holding "éa" came
    back as U+0E9A, and a JSON enum ["éa"] gave "ບ" (a random JSON schema found it). The
    text written here has `\\u00HH` instead, and is compiled as text."""
    xgr = xgrammar_module()
    if guide.kind == "json":  # before anything walks it recursively (the key's json.dumps)
        _check_nesting(guide.json)
    key = guide_key(guide)
    ebnf = _parsed.get(key)
    if ebnf is not None:
        _parsed.move_to_end(key)
        return ebnf
    kind, text = key
    if kind == "json":
        _check_json_schema(guide.json)
    try:
        if kind in JSON_KINDS:
            schema, strict = (text, True) if kind == "json" else ('{"type": "object"}', False)
            grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
            grammar = _plain_json_chars(str(grammar))
        elif kind == "regex":
            grammar = xgr.Grammar.from_regex(text)
        elif kind == "grammar":
            grammar = xgr.Grammar.from_ebnf(text)
        elif kind == "choice":
            # GBNF string literals take JSON's escapes
            grammar = xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in guide.choice))
        else:
            grammar = xgr.Grammar.from_structural_tag(text)
        ebnf = _UNSAFE_HEX_ESCAPE.sub(r"\1\\u00\2", str(grammar))
        xgr.Grammar.from_ebnf(ebnf)  # what will be compiled parses
    except Exception as e:  # xgrammar raises RuntimeError (and its own types) with a C++ location
        raise ValueError(f"guided_decoding.{kind}: {xgrammar_message(e)}") from None
    _parsed[key] = ebnf
    if len(_parsed) > _PARSED_CACHE:
        _parsed.popitem(last=False)
    return ebnf


# `\\xHH` not itself escaped (an even run of backslashes before it)
_UNSAFE_HEX_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\x([0-9a-fA-F]{2})")


def validate_guided(params: SamplingParams, has_tokenizer: bool) -> None:
    """A guided request's checks before any work (engine_limits.validate_request's, so the
    process client refuses it before sending): a ValueError naming what is wrong."""
    if params.guided_decoding is None:
        return
    if not has_tokenizer:
        raise ValueError("guided_decoding needs a tokenizer (the grammar is over token texts); this engine was "
                         "built without one")
    check_guide(params.guided_decoding)


def _nesting(value, limit: int) -> int:
    """How deep JSON containers nest in `value` (a scalar 0, `{}` 1), counted without recursion
    and only up to `limit` + 1."""
    depth, level = 0, [value]
    while depth <= limit:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            break
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return depth


_DATA_KEYWORDS = ("enum", "const", "default", "examples")  # values, not subschemas: a "$ref" in them is data


def _outside_ref(schema) -> str | None:
    """The first `$ref` that does not point inside the schema ("#" or "#/..."), or None: xgrammar
    fetches nothing and, with a warning only, lets any JSON value stand in for it."""
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref != "#" and not ref.startswith("#/"):
                return ref
            todo.extend(v for k, v in node.items() if k not in _DATA_KEYWORDS)
        elif isinstance(node, list):
            todo.extend(node)
    return None


def _check_nesting(schema) -> None:
    if _nesting(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"guided_decoding.json: the schema nests objects and arrays more than {MAX_SCHEMA_DEPTH} "
                         "levels deep")


def _check_json_schema(schema) -> None:
    """The schema's references, then the schema against the JSON Schema meta-schema, when
    jsonschema is installed (xgrammar checks only what it converts: a misspelt keyword's value
    would pass it). Its nesting was checked first (`_check_nesting`)."""
    ref = _outside_ref(schema)
    if ref is not None:
        raise ValueError(f"guided_decoding.json: $ref {ref[:200]!r} does not point inside the schema; only "
                         "references of the form '#/...' (e.g. '#/$defs/name') are resolved")
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(f"guided_decoding.json: not a valid JSON Schema: {e.message}"
                         + (f" (at {where})" if where else "")) from None


JSON_KINDS = ("json", "json_object")
_NEGATED_CLASS = re.compile(r"\[\^((?:\\.|[^\]\\])*)\]")


def _plain_json_chars(ebnf: str) -> str:
    """A JSON grammar's negated character classes (its string characters) without control
    characters and UTF-16 surrogates: xgrammar 0.2.9 lets a length-bounded string
    (`maxLength`) take raw control characters, and any string the code points U+D800-U+DFFF
    (bytes ED A0..BF xx, which no UTF-8 decoder accepts: a random model picked them)."""
    return _NEGATED_CLASS.sub(lambda m: "[^" + m.group(1) + "\\0-\\x1f\\uD800-\\uDFFF]", ebnf)


def json_safe_words(decoded_vocab: list[bytes], vocab_size: int, stop_ids: list[int]) -> torch.Tensor:
    """The bitmask of tokens that may appear in compact JSON: none holding a byte < 0x20 (JSON
    strings take control characters only escaped, and compact JSON has no newline or tab),
    and the stop tokens. JSON rows are ANDed with it: a string `pattern` (xgrammar's Regex
    node, which `_plain_json_chars` does not reach) may match raw control characters."""
    allowed = torch.tensor([not any(b < 0x20 for b in tok) for tok in decoded_vocab]
                           + [False] * (vocab_size - len(decoded_vocab)), dtype=torch.bool)[:vocab_size]
    allowed[[t for t in stop_ids if 0 <= t < vocab_size]] = True
    padded = torch.zeros((vocab_size + 31) // 32 * 32, dtype=torch.int64)
    padded[:vocab_size] = allowed.long()
    words = (padded.view(-1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def xgrammar_message(e: Exception) -> str:
    """xgrammar's message without its timestamp, C++ file:line and check text."""
    text = str(e).strip()
    text = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)
    text = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)
    return text.splitlines()[0] if text else type(e).__name__
