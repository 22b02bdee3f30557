"""OpenAI's completions API over a served model, so that OpenAI's own clients and what is built on them talk to it:

    GET  /v1/models            the one model served (its id: the build directory's name, or --model-name)
    POST /v1/completions       prompt -> choices[0].text, finish_reason ("stop" or "length"), usage
    POST /v1/chat/completions  messages -> choices[0].message, through the imported model's chat template

`stream: true` answers as server-sent events (`data: {chunk}` ..., then `data: [DONE]`), as OpenAI's API
does; `stream_options.include_usage` adds a last chunk with the usage. Generation stops at the tokenizer's
end-of-text token and at the `stop` strings. Errors are OpenAI's error object, {"error": {"message", "type",
"param", "code"}}. What this server does not do (n > 1, log-probabilities, penalties, tools) is refused by name
rather than ignored.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import Template

from planer.serve.batcher import Batcher
from planer.serve.chat import ChatTemplateError, render
from planer.serve.fields import HttpError, Spec, fields, is_int, is_number, is_text
from planer.serve.lm import Completion, ServedLM

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4  # as OpenAI's API allows


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _is_stop(v: Any) -> bool:
    return v is None or is_text(v) or (isinstance(v, list) and len(v) <= MAX_STOPS and all(is_text(s) for s in v))


def _is_stream_options(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and set(v) <= {"include_usage"}
                         and isinstance(v.get("include_usage", False), bool))


def _is_content(v: Any) -> bool:
    """A message's content: text, or a list of text parts ({"type": "text", "text": ...}) as OpenAI allows."""
    return is_text(v) or (isinstance(v, list) and len(v) > 0 and all(
        isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"} and is_text(p["text"])
        for p in v))


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(m, dict) and m.get("role") in ROLES and "content" in m and _is_content(m["content"])
        and set(m) <= {"role", "content", "name"} and (m.get("name") is None or isinstance(m["name"], str))
        for m in v)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int
    stream: bool
    include_usage: bool


class OpenAIApi:
    """The three routes' handlers over one served model. A handler returns the JSON answer, or (with
    `stream`) the chunks to send as server-sent events, its request already checked."""

    def __init__(self, lm: ServedLM, batcher: Batcher, model_id: str, template: Template | None,
                 max_new_tokens: int, on_tokens: Callable[[int], None]):
        self.lm, self.batcher, self.model_id, self.template = lm, batcher, model_id, template
        self.max_new_tokens, self.on_tokens = max_new_tokens, on_tokens
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model()]}

    def _model(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "planer"}

    def _spec(self, max_tokens: int | None) -> Spec:
        tokens = (max_tokens, lambda v: v is None or is_int(v) and 1 <= v <= self.max_new_tokens,
                  f"an integer from 1 to {self.max_new_tokens} or null")
        return {
            "model": (..., lambda v: isinstance(v, str), "the model's id (GET /v1/models)"),
            "max_tokens": tokens,
            "temperature": (1.0, lambda v: v is None or is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
            "top_p": (1.0, lambda v: v is None or is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
            "stop": (None, _is_stop, f"a string, a list of up to {MAX_STOPS} strings, or null"),
            "seed": (None, lambda v: v is None or is_int(v) and 0 <= v < 2**63, "a non-negative integer or null"),
            "stream": (False, lambda v: isinstance(v, bool), "true or false"),
            "stream_options": (None, _is_stream_options, 'null or {"include_usage": true or false}'),
            "n": (1, lambda v: v is None or v == 1, "1 (one choice per request is supported)"),
            "user": (None, lambda v: v is None or isinstance(v, str), "a string"),
        }

    def _sampling(self, values: dict[str, Any], max_tokens: int | None) -> Sampling:
        if values["model"] != self.model_id:
            raise HttpError(404, f"the model {values['model']!r} does not exist; this server serves "
                                 f"{self.model_id!r} (GET /v1/models)", param="model", code="model_not_found")
        if values["stream_options"] is not None and not values["stream"]:
            raise HttpError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        stop = values["stop"]
        return Sampling(
            max_tokens=max_tokens or self.max_new_tokens,
            temperature=1.0 if values["temperature"] is None else float(values["temperature"]),
            top_p=1.0 if values["top_p"] is None else float(values["top_p"]),
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            seed=secrets.randbits(63) if values["seed"] is None else values["seed"],
            stream=values["stream"],
            include_usage=bool((values["stream_options"] or {}).get("include_usage", False)))

    async def completions(self, body: dict[str, Any]) -> dict[str, Any] | AsyncGenerator[dict[str, Any], None]:
        spec = self._spec(16) | {"prompt": (..., lambda v: is_text(v) or isinstance(v, list) and len(v) == 1
                                            and is_text(v[0]), "a non-empty string (one prompt per request)")}
        values = fields(body, spec)
        sampling = self._sampling(values, values["max_tokens"])
        prompt = values["prompt"] if isinstance(values["prompt"], str) else values["prompt"][0]
        return await self._answer("text_completion", "cmpl", self.lm.encode_prompt(prompt), sampling, chat=False)

    async def chat(self, body: dict[str, Any]) -> dict[str, Any] | AsyncGenerator[dict[str, Any], None]:
        spec = self._spec(None) | {
            "messages": (..., _is_messages, f"a non-empty list of {{role, content}} messages (role one of "
                                            f"{', '.join(ROLES)}; content text or text parts)"),
            "max_completion_tokens": (None, lambda v: v is None or is_int(v) and 1 <= v <= self.max_new_tokens,
                                      f"an integer from 1 to {self.max_new_tokens} or null")}
        values = fields(body, spec)
        if values["max_tokens"] is not None and values["max_completion_tokens"] is not None:
            raise HttpError(400, "give 'max_completion_tokens' or 'max_tokens', not both", param="max_tokens")
        sampling = self._sampling(values, values["max_completion_tokens"] or values["max_tokens"])
        if self.template is None:
            raise HttpError(400, f"the model {self.model_id!r} has no chat template (only models imported with "
                                 "one do); use /v1/completions with a prompt", param="messages")
        messages = [{**m, "content": m["content"] if isinstance(m["content"], str)
                     else "".join(p["text"] for p in m["content"])} for m in values["messages"]]
        try:
            prompt = render(self.template, messages, self.lm.tokenizer.special)
        except ChatTemplateError as e:
            raise HttpError(400, str(e), param="messages") from None
        return await self._answer("chat.completion", "chatcmpl", self.lm.encode_prompt(prompt), sampling, chat=True)

    async def _answer(self, kind: str, prefix: str, ids: Any, s: Sampling, *, chat: bool
                      ) -> dict[str, Any] | AsyncGenerator[dict[str, Any], None]:
        completion = self.lm.completion(ids, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                        seed=s.seed, stop=s.stop)
        head = {"id": f"{prefix}-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()),
                "model": self.model_id, "system_fingerprint": None}
        if s.stream:
            return self._chunks(head, completion, chat, s.include_usage)
        try:
            async with self.batcher.stream():
                await completion.finish()
        finally:
            self.on_tokens(completion.sampled)
        text = ({"message": {"role": "assistant", "content": completion.text}} if chat
                else {"text": completion.text})
        return {**head, "choices": [{"index": 0, **text, "logprobs": None,
                                     "finish_reason": completion.finish_reason}], "usage": _usage(completion)}

    async def _chunks(self, head: dict[str, Any], completion: Completion, chat: bool, include_usage: bool
                      ) -> AsyncGenerator[dict[str, Any], None]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": piece} if piece is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice]} | ({"usage": None} if include_usage else {})

        try:
            async with self.batcher.stream():
                if chat:
                    yield chunk("", role=True)
                async for piece in completion.pieces():
                    yield chunk(piece)
        finally:
            self.on_tokens(completion.sampled)
        yield chunk(None, completion.finish_reason)
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(completion)}


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.sampled,
            "total_tokens": c.prompt_tokens + c.sampled}
