"""The HTTP API (Starlette, served by uvicorn):

    POST /v1/score     {"text": "..."}                        -> tokens, loss, bpc (bytes) or ppl (words)
    POST /v1/generate  {"prompt": "...", "max_tokens": 64, "temperature": 0, "top_p": 1, "seed": null}
                                                              -> text, tokens, seed, finish_reason (greedy at
                                                                 temperature 0; "stop" at end-of-text)
    POST /v1/completions, POST /v1/chat/completions, GET /v1/models
                       OpenAI's API, streaming included (planer.serve.openai_api)
    GET  /healthz      the model, the engine and its settings
    GET  /metrics      Prometheus text: requests, latencies, batch sizes, queue depth

Errors are JSON {"error": "..."} (OpenAI's error object on OpenAI's routes): 400 for malformed or out-of-range
input, 404/405
for an unknown route or method, 408 for a body not received within `body_timeout_s` (a connection that has not
sent a request's headers in full by then is closed: planer.serve.connections),
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
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from planer import __version__
from planer.arch import Architecture
from planer.errors import PlanerError
from planer.files import TOKENIZER_DIR, exported_model
from planer.runtime import Engine, feeds, load_engine
from planer.serve.batcher import Batcher
from planer.serve.chat import compile_template
from planer.serve.fields import HttpError, fields, is_int, is_number, is_text
from planer.serve.lm import BadRequest, ServedLM
from planer.serve.openai_api import OpenAIApi, error_body
from planer.serve.text import load_tokenizer


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 8  # steps stacked into one engine call
    max_delay_ms: float = 2.0  # how long a step waits for others of its shape
    max_queue: int = 64  # requests in flight at once; one more gets 503
    max_body_bytes: int = 1 << 20
    max_input_tokens: int = 65536  # of a text to score or a prompt
    max_new_tokens: int = 1024
    body_timeout_s: float = 10.0  # a body not received in full by then is answered 408; headers: the connection closes

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
Answer = dict[str, Any] | AsyncGenerator[dict[str, Any], None]  # a handler's JSON answer, or the chunks of a stream
CLIENT_CLOSED = 499  # nginx's code for a request whose client went away before the answer


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


def _error(status: int, message: str, headers: dict[str, str] | None = None, *, openai: bool = False,
           param: str | None = None, code: str | None = None) -> JSONResponse:
    """The error answer: {"error": message}, or OpenAI's error object on its routes."""
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = "1"
    if status == 408:  # the rest of the body may still be on its way: do not read it as the next request
        headers["Connection"] = "close"
    body = error_body(status, message, param, code) if openai else {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


async def _read_body(request: Request, config: ServeConfig) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(_body(request, config.max_body_bytes), config.body_timeout_s)
    except asyncio.TimeoutError:
        raise HttpError(408, f"request body not received within {config.body_timeout_s:g} s") from None
    except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing failed
        raise HttpError(CLIENT_CLOSED, "the client closed the connection during its request body") from None


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Answer]) -> Answer:
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
        raise HttpError(CLIENT_CLOSED, "the client closed the connection")
    return task.result()


async def _events(request: Request, chunks: AsyncGenerator[dict, None], done: Callable[[int], None]
                  ) -> AsyncGenerator[str, None]:
    """`chunks` as server-sent events, then `data: [DONE]`. The client going away cancels the chunk being made,
    so its generation takes no further engine step; an engine failure ends the stream with an error event.
    `done` receives the request's status (200, 499 or 500) once the stream has ended."""
    # One listener for the whole stream, not `_unless_disconnected` per chunk: a receive() cancelled and started
    # again between chunks missed the disconnect (measured: the abandoned-stream test's generation went on).
    gone = asyncio.ensure_future(_until_disconnected(request))
    status = 200
    try:
        while True:
            step = asyncio.ensure_future(chunks.__anext__())
            await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
                status = CLIENT_CLOSED
                return
            try:
                chunk = step.result()
            except StopAsyncIteration:
                break
            except Exception as e:  # headers are sent: the failure can only be told in the stream
                log.exception("a stream ended by an engine failure")
                status = 500
                yield f"data: {json.dumps(error_body(500, f'engine failed: {e}'))}\n\n"
                return
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await chunks.aclose()
        done(status)


class _Streamed(StreamingResponse):
    """Server-sent events whose request is accounted for however the stream ends: `done(499)` runs if the events
    never finished (a client gone before the first of them never starts the generator, so its own clean-up
    cannot), and a client gone is nothing to log."""

    def __init__(self, events: AsyncGenerator[str, None], done: Callable[[int], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.done = done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self.body_iterator.aclose()
            self.done(CLIENT_CLOSED)


async def _body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body is {declared} bytes; the limit is {limit}")
    raw = bytearray()  # appended in place: bytes += chunk would copy the body so far for every chunk
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise HttpError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HttpError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise HttpError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    return body


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _hostname(authority: str) -> str | None:
    """The host of a Host header or an Origin's network location, without its port, lowercased."""
    try:
        return urlsplit(f"//{authority}").hostname
    except ValueError:
        return None


class _KnownHostsOnly:
    """Refuses (403) a request whose Host, or Origin when a browser sent one, names another host than `hosts`: a
    web page the user visits could otherwise drive a server bound to this machine, and through DNS rebinding
    (its own name resolved to 127.0.0.1) read the answers."""

    def __init__(self, app: Any, hosts: Sequence[str]):
        self.app, self.hosts = app, {h.lower().strip("[]") for h in hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host = _hostname(headers.get(b"host", b"").decode("latin-1"))
            origin = headers.get(b"origin")
            origin_host = None if origin is None else _hostname(urlsplit(origin.decode("latin-1")).netloc)
            if host not in self.hosts or (origin is not None and origin_host not in self.hosts):
                what = f"Host {host!r}" if host not in self.hosts else f"Origin {origin.decode('latin-1')!r}"
                response = _error(403, f"{what} is not one this server answers ({', '.join(sorted(self.hosts))}); "
                                       "start it with --allow-host NAME to add one")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _check_agrees(engine: Engine, arch: Architecture, build: Path) -> None:
    """One step of one token through the engine before serving: a model.onnx that computes another vocabulary or
    width than arch.json describes is refused here, not answered 500 at every request."""
    try:
        out = engine.run(feeds.example_feeds(arch, 1, 1, 0))
    except Exception as e:  # ONNX Runtime's own errors: the shapes arch.json gives do not fit the graph
        raise PlanerError(f"{build}: model.onnx does not run on the inputs arch.json describes "
                          f"({str(e).splitlines()[0][:200]}); re-export the model (`planer export`)") from None
    widths = {name: value.shape[-1] for name, value in out.items() if name.startswith("new_")}
    if out["logits"].shape[-1] != arch.vocab_size or any(w != arch.d_model for w in widths.values()):
        raise PlanerError(f"{build}: model.onnx computes {out['logits'].shape[-1]} logits and memories of width "
                          f"{sorted(set(widths.values()))}, arch.json describes {arch.vocab_size} and "
                          f"{arch.d_model}; re-export the model (`planer export`)")


def create_app(build_dir: str | Path, *, engine: str = "ort", threads: int | None = None,
               config: ServeConfig = ServeConfig(), model_name: str | None = None,
               allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The server for a build directory (its model.onnx and arch.json) on the named engine; OpenAI's routes call
    its model `model_name` (default: the directory's name). With `allowed_hosts`, requests naming another host
    (Host, or a browser's Origin) are refused."""
    config = config.validate()
    build = Path(build_dir)
    model_id = model_name or build.resolve().name
    if not model_id.strip():
        raise PlanerError("--model-name must not be empty")
    model_path, arch = exported_model(build, "model to serve")
    eng = load_engine(engine, str(model_path), threads=threads,
                      shape=(config.max_batch, arch.tgt_len, arch.mem_len))
    if eng.input_names != feeds.input_names(arch):
        raise PlanerError(f"{build}: model.onnx takes {eng.input_names}, arch.json describes "
                          f"{feeds.input_names(arch)}; re-export the model (`planer export`)")
    _check_agrees(eng, arch, build)
    metrics = _Metrics()
    batcher = Batcher(eng, max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1e3,
                      on_batch=metrics.on_batch)
    lm = ServedLM(arch, batcher, load_tokenizer(build, arch.vocab_size), max_input_tokens=config.max_input_tokens)
    in_flight = 0

    def endpoint(route: str, handler: Callable[[dict[str, Any]], Awaitable[Answer]], openai: bool = False) -> Route:
        """`handler` behind the body limits, the queue, the metrics and the error answers. A handler that returns
        chunks is streamed (server-sent events), keeping its place in the queue until the stream ends."""
        async def answer(request: Request) -> Response:
            nonlocal in_flight
            start = time.perf_counter()

            finished = False

            def done(status: int) -> None:  # a stream's end, however it comes: once
                nonlocal in_flight, finished
                if finished:
                    return
                finished = True
                in_flight -= 1
                metrics.in_flight.set(in_flight)
                metrics.requests.labels(route, str(status)).inc()
                metrics.latency.labels(route).observe(time.perf_counter() - start)

            try:
                body = await _read_body(request, config)
                if in_flight >= config.max_queue:
                    raise HttpError(503, f"server busy: {in_flight} requests in flight (max-queue "
                                         f"{config.max_queue}); retry later")
                in_flight += 1
                metrics.in_flight.set(in_flight)
                try:
                    result = await _unless_disconnected(request, handler(body))
                except BaseException:
                    in_flight -= 1
                    metrics.in_flight.set(in_flight)
                    raise
                if not isinstance(result, dict):
                    return _Streamed(_events(request, result, done), done)
                in_flight -= 1
                metrics.in_flight.set(in_flight)
                response: Response = JSONResponse(result)
            except HttpError as e:
                response = _error(e.status, str(e), openai=openai, param=e.param, code=e.code)
            except BadRequest as e:
                response = _error(400, str(e), openai=openai)
            except Exception as e:  # an engine failure answers this request and leaves the server up
                log.exception("%s answered 500", route)
                response = _error(500, f"engine failed: {e}", openai=openai)
            metrics.requests.labels(route, str(response.status_code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
            return response

        return Route(route, answer, methods=["POST"])

    async def score(body: dict[str, Any]) -> dict:
        body = fields(body, {"text": (..., is_text, "a non-empty string of Unicode text")})
        async with batcher.stream():
            return await lm.score(body["text"])

    async def generate(body: dict[str, Any]) -> dict:
        body = fields(body, {
            "prompt": (..., is_text, "a non-empty string of Unicode text"),
            "max_tokens": (64, lambda v: is_int(v) and 1 <= v <= config.max_new_tokens,
                           f"an integer from 1 to {config.max_new_tokens}"),
            "temperature": (0.0, lambda v: is_number(v) and 0 <= v <= 100, "a number from 0 (greedy) to 100"),
            "top_p": (1.0, lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
            "seed": (None, lambda v: v is None or is_int(v) and 0 <= v < 2**63, "a non-negative integer or null"),
        })
        seed = secrets.randbits(63) if body["seed"] is None else body["seed"]
        async with batcher.stream():
            result = await lm.generate(body["prompt"], max_tokens=body["max_tokens"],
                                       temperature=float(body["temperature"]), top_p=float(body["top_p"]), seed=seed)
        metrics.generated.inc(len(result["tokens"]))
        return result

    template = (compile_template(lm.tokenizer.chat_template, f"{build}/{TOKENIZER_DIR}")
                if lm.tokenizer.chat_template else None)
    api = OpenAIApi(lm, batcher, model_id, template, config.max_new_tokens, metrics.generated.inc)

    async def models(request: Request) -> Response:
        metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse(api.models())

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

    middleware = [Middleware(_KnownHostsOnly, hosts=allowed_hosts)] if allowed_hosts is not None else []
    return Starlette(middleware=middleware, routes=[endpoint("/v1/score", score), endpoint("/v1/generate", generate),
                             endpoint("/v1/completions", api.completions, openai=True),
                             endpoint("/v1/chat/completions", api.chat, openai=True), Route("/v1/models", models),
                             Route("/healthz", healthz), Route("/metrics", prometheus)],
                     exception_handlers={404: http_error, 405: http_error}, lifespan=lifespan)
