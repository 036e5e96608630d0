"""JSON from records anyone may have produced: parsed strictly, with bounds, or refused with a
reason. Python's ``json`` alone accepts NaN and Infinity, turns 1e400 into inf, raises
RecursionError (not ValueError) on deep nesting and ValueError past 4,300 digits, and lets
``"\\ud800"`` through as a lone surrogate that no UTF-8 encoder takes: each of those, passed on,
fails later and further from the record (the sink, a checkpoint, the tokenizer)."""

from __future__ import annotations

import json
import math
from typing import Any

# Objects and arrays inside one another: a document needs 2 (its meta, one level in).
MAX_DEPTH = 32


class UntrustedJSONError(ValueError):
    """Why a record's JSON is refused (the message is the dead letter's reason)."""


def loads_untrusted(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """``text`` as JSON, or UntrustedJSONError: no NaN, Infinity or number that overflows to
    either; at most ``max_depth`` levels of nesting; every string, keys included, valid Unicode
    (encodable as UTF-8)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_unique_fields)
    except RecursionError:
        raise UntrustedJSONError(f"JSON nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as err:
        raise UntrustedJSONError(f"bad JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UntrustedJSONError:
        raise
    except ValueError as err:  # ours, or an integer of too many digits
        raise UntrustedJSONError(f"bad JSON: {err}") from None
    _check_tree(value, max_depth)
    return value


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of two equal keys, other parsers the first: the same record would
    # say two things.
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise UntrustedJSONError(f"duplicate field {twice[:64]!r}")
    return fields


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:20]} is out of range")
    return value


def _check_tree(value: Any, max_depth: int) -> None:
    # Iterative, so that what json.loads could build never exhausts our own stack.
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= max_depth:
                raise UntrustedJSONError(f"JSON nested deeper than {max_depth} levels")
            if isinstance(node, dict):
                for key, item in node.items():
                    _check_string(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            _check_string(node)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UntrustedJSONError(f"invalid UTF-8: lone surrogate {text[err.start]!r} in a string") from None
