"""Chat messages to prompt text with the imported checkpoint's own chat template: a Jinja template rendered as
transformers renders it (sandboxed, trimmed blocks, `raise_exception`, the tokenizer's special tokens,
`add_generation_prompt`), so that a served model reads a conversation as it was trained to."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NoReturn

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from planer.errors import PlanerError


class ChatTemplateError(ValueError):
    """The template refused the conversation (its own `raise_exception`, e.g. roles that do not alternate)."""


def _raise(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def compile_template(source: str, where: str) -> Template:
    """The template ready to render; a syntax error is the model's problem, refused before serving."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise PlanerError(f"{where}: the chat template does not parse ({e}); import the model again") from None


def render(template: Template, messages: list[dict[str, Any]], special: dict[str, str | None]) -> str:
    """The prompt for `messages` ({role, content} each), ending where the assistant's answer begins."""
    try:
        return template.render(messages=messages, add_generation_prompt=True, **special)
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
        raise ChatTemplateError(f"the model's chat template cannot render these messages: {e}") from None
