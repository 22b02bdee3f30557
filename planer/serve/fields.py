"""A request's JSON fields checked one by one: what each must be, refused with the reason (HTTP 400)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


class HttpError(Exception):
    """An answer other than 200: its status, the reason, and (for OpenAI's error object) the field at fault and
    a machine-readable code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_text(v: Any) -> bool:
    """A non-empty string every tokenizer can encode: JSON's \\ud800-style escapes can carry lone surrogates,
    which are not Unicode text."""
    if not isinstance(v, str) or v == "":
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


Spec = dict[str, tuple[Any, Callable[[Any], bool], str]]  # name -> (default, or ... if required; valid; meaning)


def fields(body: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """The request's fields checked against `spec`; unknown fields are refused so that typos show."""
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise HttpError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(spec)}")
    values = {}
    for name, (default, valid, meaning) in spec.items():
        if name not in body and default is ...:
            raise HttpError(400, f"missing field '{name}'", param=name)
        values[name] = body.get(name, default)
        if name in body and not valid(body[name]):
            raise HttpError(400, f"'{name}' must be {meaning}, got {json.dumps(body[name])[:40]}", param=name)
    return values
