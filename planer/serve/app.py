"""The HTTP API (Starlette, served by uvicorn):

    POST /v1/score     {"text": "..."}                        -> tokens, loss, bpc (bytes) or ppl (words)
    POST /v1/generate  {"prompt": "...", "max_tokens": 64, "temperature": 0, "top_p": 1, "seed": null}
                                                              -> text, tokens, seed (greedy at temperature 0)
    GET  /healthz      the model, the engine and its settings
    GET  /metrics      Prometheus text: requests, latencies, batch sizes, queue depth

Errors are JSON {"error": "..."}: 400 for malformed or out-of-range input, 404/405
for an unknown route or method, 408 for a body not received within `body_timeout_s`,
413 for a body over the limit, 503 when `max_queue` requests are already in flight
(the request was not started; retry later). A request counts against `max_queue`
only once its whole body has arrived, so slow uploads cannot crowd out the rest,
and a client that disconnects stops its request (counted as code 499 in /metrics).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from planer import __version__
from planer.errors import PlanerError
from planer.files import exported_model
from planer.runtime import feeds, load_engine
from planer.serve.batcher import Batcher
from planer.serve.lm import BadRequest, ServedLM
from planer.serve.text import load_tokenizer


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 8  # steps stacked into one engine call
    max_delay_ms: float = 2.0  # how long a step waits for others of its shape
    max_queue: int = 64  # requests in flight at once; one more gets 503
    max_body_bytes: int = 1 << 20
    max_input_tokens: int = 65536  # of a text to score or a prompt
    max_new_tokens: int = 1024
    body_timeout_s: float = 10.0  # a body not received in full by then is answered 408

    def validate(self) -> ServeConfig:
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_input_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise PlanerError(f"{name.replace('_', '-')} must be at least 1")
        if not self.max_delay_ms >= 0:
            raise PlanerError("max-delay-ms must be 0 or more")
        if not 0 < self.body_timeout_s < float("inf"):
            raise PlanerError("body-timeout-s must be a positive number of seconds")
        return self


log = logging.getLogger("planer.serve")
CLIENT_CLOSED = 499  # nginx's code for a request whose client went away before the answer


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("planer_requests", "HTTP requests answered", ["route", "code"],
                                registry=self.registry)
        self.latency = Histogram("planer_request_seconds", "Time to answer a request", ["route"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch = Histogram("planer_batch_size", "Steps per engine call", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=self.registry)
        self.engine = Histogram("planer_engine_seconds", "Time of one engine call",
                                buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=self.registry)
        self.in_flight = Gauge("planer_requests_in_flight", "Requests admitted and not yet answered",
                               registry=self.registry)
        self.queued_steps = Gauge("planer_queued_steps", "Steps waiting for the engine", registry=self.registry)
        self.generated = Counter("planer_generated_tokens", "Tokens generated", registry=self.registry)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.engine.observe(seconds)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_text(v: Any) -> bool:
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


def _fields(body: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """The request's fields checked against `spec`; unknown fields are refused so that typos show."""
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise _HttpError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(spec)}")
    values = {}
    for name, (default, valid, meaning) in spec.items():
        if name not in body and default is ...:
            raise _HttpError(400, f"missing field '{name}'")
        values[name] = body.get(name, default)
        if name in body and not valid(body[name]):
            raise _HttpError(400, f"'{name}' must be {meaning}, got {json.dumps(body[name])[:40]}")
    return values


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = "1"
    if status == 408:  # the rest of the body may still be on its way: do not read it as the next request
        headers["Connection"] = "close"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, config: ServeConfig) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(_body(request, config.max_body_bytes), config.body_timeout_s)
    except asyncio.TimeoutError:
        raise _HttpError(408, f"request body not received within {config.body_timeout_s:g} s") from None


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[dict]) -> dict:
    """`work`'s answer, or a 499 once the client has gone: its steps still queued are then dropped
    (planer.serve.batcher) rather than computed for nobody."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled():
        raise _HttpError(CLIENT_CLOSED, "the client closed the connection")
    return task.result()


async def _body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HttpError(413, f"request body is {declared} bytes; the limit is {limit}")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise _HttpError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _HttpError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise _HttpError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise _HttpError(400, "the body must be a JSON object")
    return body


def create_app(build_dir: str | Path, *, engine: str = "ort", threads: int | None = None,
               config: ServeConfig = ServeConfig()) -> Starlette:
    """The server for a build directory (its model.onnx and arch.json) on the named engine."""
    config = config.validate()
    build = Path(build_dir)
    model_path, arch = exported_model(build, "model to serve")
    eng = load_engine(engine, str(model_path), threads=threads,
                      shape=(config.max_batch, arch.tgt_len, arch.mem_len))
    if eng.input_names != feeds.input_names(arch):
        raise PlanerError(f"{build}: model.onnx takes {eng.input_names}, arch.json describes "
                          f"{feeds.input_names(arch)}; re-export the model (`planer export`)")
    metrics = _Metrics()
    batcher = Batcher(eng, max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1e3,
                      on_batch=metrics.on_batch)
    lm = ServedLM(arch, batcher, load_tokenizer(build, arch.vocab_size), max_input_tokens=config.max_input_tokens)
    in_flight = 0

    def endpoint(route: str, handler: Callable[[dict[str, Any]], Awaitable[dict]]) -> Route:
        async def answer(request: Request) -> Response:
            nonlocal in_flight
            start = time.perf_counter()
            try:
                body = await _read_body(request, config)
                if in_flight >= config.max_queue:
                    raise _HttpError(503, f"server busy: {in_flight} requests in flight (max-queue "
                                          f"{config.max_queue}); retry later")
                in_flight += 1
                metrics.in_flight.set(in_flight)
                try:
                    response = JSONResponse(await _unless_disconnected(request, handler(body)))
                finally:
                    in_flight -= 1
                    metrics.in_flight.set(in_flight)
            except _HttpError as e:
                response = _error(e.status, str(e))
            except BadRequest as e:
                response = _error(400, str(e))
            except Exception as e:  # an engine failure answers this request and leaves the server up
                log.exception("%s answered 500", route)
                response = _error(500, f"engine failed: {e}")
            metrics.requests.labels(route, str(response.status_code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
            return response

        return Route(route, answer, methods=["POST"])

    async def score(body: dict[str, Any]) -> dict:
        body = _fields(body, {"text": (..., _is_text, "a non-empty string of Unicode text")})
        async with batcher.stream():
            return await lm.score(body["text"])

    async def generate(body: dict[str, Any]) -> dict:
        body = _fields(body, {
            "prompt": (..., _is_text, "a non-empty string of Unicode text"),
            "max_tokens": (64, lambda v: _is_int(v) and 1 <= v <= config.max_new_tokens,
                           f"an integer from 1 to {config.max_new_tokens}"),
            "temperature": (0.0, lambda v: _is_number(v) and 0 <= v <= 100, "a number from 0 (greedy) to 100"),
            "top_p": (1.0, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
            "seed": (None, lambda v: v is None or _is_int(v) and 0 <= v < 2**63, "a non-negative integer or null"),
        })
        seed = secrets.randbits(63) if body["seed"] is None else body["seed"]
        async with batcher.stream():
            result = await lm.generate(body["prompt"], max_tokens=body["max_tokens"],
                                       temperature=float(body["temperature"]), top_p=float(body["top_p"]), seed=seed)
        metrics.generated.inc(len(result["tokens"]))
        return result

    async def healthz(request: Request) -> Response:
        metrics.requests.labels("/healthz", "200").inc()
        return JSONResponse({"status": "ok", "planer": __version__, "model": str(build), "arch": arch.summary(),
                             "engine": eng.provenance(), "config": config.__dict__})

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own 404 and 405, answered as JSON like every other error and counted."""
        assert isinstance(exc, HTTPException)
        known = exc.status_code == 405  # the path exists: its label is bounded, an unknown path's is not
        metrics.requests.labels(request.url.path if known else "unmatched", str(exc.status_code)).inc()
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", exc.headers)

    async def prometheus(request: Request) -> Response:
        metrics.queued_steps.set(batcher.pending)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        batcher.start()
        yield
        await batcher.stop()

    return Starlette(routes=[endpoint("/v1/score", score), endpoint("/v1/generate", generate),
                             Route("/healthz", healthz), Route("/metrics", prometheus)],
                     exception_handlers={404: http_error, 405: http_error}, lifespan=lifespan)
