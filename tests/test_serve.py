"""`planer serve` over real HTTP on 127.0.0.1: answers against PyTorch, batching, bad input, overload."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from planer.arch import BlockSpec
from planer.checkpoint import save_weights
from planer.errors import PlanerError
from planer.export import export_lm
from planer.nn import LM
from planer.serve import ServeConfig, create_app, server_config
from tests.conftest import small_arch


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> tuple[Path, LM]:
    return random_build(tmp_path_factory.mktemp("build"))


def random_build(out: Path) -> tuple[Path, LM]:
    """A random model with two memories and an MoE block, laid out like a build directory."""
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(64), BlockSpec.attn(2, 16), BlockSpec.moe(4, 2, 32)],
                      tgt_len=8, mem_len=32)
    torch.manual_seed(0)
    model = LM(arch).eval()
    arch.save(out / "arch.json")
    save_weights(model, out / "model.safetensors")
    export_lm(model, out / "model.onnx")
    return out, model


@contextmanager
def running(build: Path, allowed_hosts: list[str] | None = None, **config):
    """The server in a thread of this process, on a free port of 127.0.0.1."""
    settings = ServeConfig(**config)
    app = create_app(build, threads=1, config=settings, allowed_hosts=allowed_hosts)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _metric(text: str, name: str, having: str = "") -> float:
    """The sum of a Prometheus metric's samples whose labels include `having`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and having in line)


def test_score_and_generate_match_pytorch(build_dir):
    build, model = build_dir
    text = "The quick brown fox jumps ove"  # 29 bytes: within mem_len, so one PyTorch pass sees the same context
    ids = torch.tensor([list(text.encode())])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    ref_bits = -logp.gather(1, ids[0, 1:, None]).sum().item() / math.log(2)
    prompt = "Sparse experts"  # 14 bytes: two segments of tgt_len 8, then one token per step
    tokens = list(prompt.encode())
    with torch.no_grad():  # greedy by recomputing the whole prefix: no memories involved
        for _ in range(12):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    with running(build) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/score", json={"text": text})
        assert r.status_code == 200, r.text
        s = r.json()
        assert s["tokens"] == 29 and s["scored"] == 28
        assert abs(-s["log_prob"] / math.log(2) - ref_bits) < 1e-3
        assert abs(s["bpc"] - ref_bits / 28) < 1e-4
        g = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": 12}).json()
        assert g["tokens"] == tokens[14:] and g["prompt_tokens"] == 14
        sampled = [client.post("/v1/generate", json={"prompt": prompt, "max_tokens": 20, "temperature": 1.0,
                                                     "top_p": 0.9, "seed": 7}).json() for _ in range(2)]
        assert sampled[0]["tokens"] == sampled[1]["tokens"] and sampled[0]["seed"] == 7
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["engine"]["engine"] == "ort"


def test_concurrent_requests_share_engine_calls_and_get_their_own_answers(build_dir):
    build, _ = build_dir
    prompts = [f"prompt number {i:02d}" for i in range(8)]  # same length: their steps can be stacked
    with running(build, max_batch=8, max_delay_ms=50) as url, httpx.Client(base_url=url, timeout=60) as client:
        alone = [client.post("/v1/generate", json={"prompt": p, "max_tokens": 10}).json()["tokens"] for p in prompts]
        before = client.get("/metrics").text
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: client.post("/v1/generate",
                                                           json={"prompt": p, "max_tokens": 10}).json(), prompts))
        after = client.get("/metrics").text
    assert [g["tokens"] for g in together] == alone
    calls = _metric(after, "planer_batch_size_count") - _metric(before, "planer_batch_size_count")
    steps = _metric(after, "planer_batch_size_sum") - _metric(before, "planer_batch_size_sum")
    assert steps == 8 * (2 + 9)  # each request: two prompt segments, then nine one-token steps
    assert calls < steps / 2, f"{steps} steps took {calls} engine calls: little batching"


def test_bad_requests_get_400_or_413_and_the_server_keeps_serving(build_dir):
    build, _ = build_dir
    bad = [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 1.5}', 400, "max_tokens"),
        (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
        (b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
        (b'{"prompt": "x", "seed": "abc"}', 400, "seed"),
        (b'{"prompt": ""}', 400, "prompt"),
        (b'{"promt": "x"}', 400, "unknown field"),
        (b'{"max_tokens": 3}', 400, "missing field 'prompt'"),
        (b'{"prompt": "' + b"x" * 3000 + b'"}', 413, "limit"),
    ]
    with running(build, max_body_bytes=2048) as url, httpx.Client(base_url=url, timeout=30) as client:
        for body, status, words in bad:
            r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status and words in r.json()["error"], (body[:40], r.status_code, r.text)
        r = client.post("/v1/score", json={"text": "x"})
        assert r.status_code == 400 and "'text' has 1 token" in r.json()["error"]
        assert client.post("/v1/generate", json={"prompt": "still here", "max_tokens": 3}).status_code == 200


def test_overload_is_refused_with_503_and_no_request_is_lost_or_answered_twice(build_dir):
    build, _ = build_dir
    texts = ["x" * (2 + i) for i in range(240)]  # distinct lengths: each answer shows whose request it was
    with running(build, max_queue=4) as url:
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=48)) as client:
            with ThreadPoolExecutor(48) as pool:
                answers = list(pool.map(lambda t: client.post("/v1/score", json={"text": t}), texts))
            counted = _metric(client.get("/metrics").text, "planer_requests_total", 'route="/v1/score"')
            after = client.post("/v1/score", json={"text": "after the storm"})
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and codes.count(200) > 0 and codes.count(503) > 0, codes
    for text, r in zip(texts, answers):
        body = r.json()
        assert body["tokens"] == len(text) if r.status_code == 200 else "busy" in body["error"]
    assert counted == len(texts)  # the server answered each request exactly once
    assert after.status_code == 200


def test_serve_cli_refuses_a_directory_without_a_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "planer", "serve", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "no arch.json" in r.stderr and "Traceback" not in r.stderr


def test_sampling_keeps_to_the_nucleus():
    from planer.serve.text import sample

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    drawn = {sample(logits, 1.0, 0.75, rng) for _ in range(300)}
    assert drawn == {0, 1}
    assert sample(logits, 0.0, 1.0, rng) == 0


def test_a_model_with_its_own_tokenizer_is_scored_in_perplexity(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tokenizer").mkdir()
    tok.save(str(tmp_path / "tokenizer" / "tokenizer.json"))
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(64)], vocab_size=len(words), tgt_len=8, mem_len=16)
    torch.manual_seed(0)
    model = LM(arch).eval()
    arch.save(tmp_path / "arch.json")
    export_lm(model, tmp_path / "model.onnx")
    ids = torch.tensor([[1, 2, 3, 4, 1, 5]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    ref_loss = -logp.gather(1, ids[0, 1:, None]).mean().item()
    with running(tmp_path) as url, httpx.Client(base_url=url, timeout=30) as client:
        s = client.post("/v1/score", json={"text": "the cat sat on the mat"}).json()
        g = client.post("/v1/generate", json={"prompt": "the dog", "max_tokens": 4}).json()
    assert s["tokens"] == 6 and abs(s["ppl"] - math.exp(ref_loss)) < 1e-3 * math.exp(ref_loss)
    assert len(g["tokens"]) == 4 and all(w in words for w in g["text"].split())


def _raw(url: str, request: bytes) -> socket.socket:
    """A connection that has sent `request` (perhaps only part of one) and stays open."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(request)
    return conn


def test_slow_uploads_are_answered_408_and_hold_no_place_in_the_queue(build_dir):
    build, _ = build_dir
    with running(build, max_queue=2, body_timeout_s=1.5) as url, httpx.Client(base_url=url, timeout=30) as client:
        started = time.monotonic()
        slow = [_raw(url, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 40\r\n\r\n{\"text\": \"trick") for _ in range(4)]
        time.sleep(0.2)  # the server has accepted them and is waiting for the rest of their bodies
        codes = [client.post("/v1/score", json={"text": f"real request {i}"}).status_code for i in range(3)]
        assert codes == [200, 200, 200], codes
        assert time.monotonic() - started < 1.5, "the real requests waited for the slow ones"
        answers = []
        for conn in slow:
            answers.append(b"".join(iter(lambda: conn.recv(4096), b"")))  # the server closes the connection
            conn.close()
    assert all(a.startswith(b"HTTP/1.1 408") and b"not received within 1.5 s" in a for a in answers), answers


def test_connections_that_never_finish_their_headers_are_closed(build_dir):
    build, _ = build_dir
    with running(build, body_timeout_s=0.5, max_new_tokens=20000) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        started = time.monotonic()
        silent = [_raw(url, b"") for _ in range(3)]
        trickling = [_raw(url, b"POST /v1/score HTTP/1.1\r\nHost: x\r\n") for _ in range(3)]
        time.sleep(0.3)
        for conn in trickling:  # a byte now and then must not keep a connection that never ends its headers
            conn.sendall(b"X")
        assert client.post("/v1/score", json={"text": "meanwhile"}).status_code == 200
        for conn in silent + trickling:
            assert conn.recv(4096) == b""  # closed by the server (the socket's own timeout is 10 s)
            conn.close()
        assert time.monotonic() - started < 3
        # the deadline is on the headers alone: an answer that takes longer is not cut
        started = time.monotonic()
        answer = client.post("/v1/generate", json={"prompt": "a", "max_tokens": 8000})
        assert answer.status_code == 200 and time.monotonic() - started > 0.5


def _closed(conn: socket.socket, within_s: float = 2.0) -> bool:
    """Whether the server closes `conn` (unanswered) within `within_s`."""
    conn.settimeout(within_s)
    try:
        return conn.recv(4096) == b""
    except TimeoutError:
        return False


def test_at_the_connection_cap_the_longest_waiting_connection_makes_room(build_dir, monkeypatch):
    build, _ = build_dir
    monkeypatch.setattr("planer.serve.connections.connection_cap", lambda: 3)
    request = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 14\r\n"
    with running(build) as url:
        silent = [_raw(url, b"") for _ in range(3)]
        time.sleep(0.2)
        valid = _raw(url, request + b"Connection: close\r\n\r\n{\"text\": \"ab\"}")
        assert b"".join(iter(lambda: valid.recv(4096), b"")).startswith(b"HTTP/1.1 200")
        assert _closed(silent[0]) and not _closed(silent[1], 0.3) and not _closed(silent[2], 0.3)
        busy = [_raw(url, request + b"\r\n{\"te") for _ in range(3)]  # each begins a request: not to be closed
        time.sleep(0.2)
        assert _closed(silent[1]) and _closed(silent[2])
        refused = _raw(url, b"")
        answer = b"".join(iter(lambda: refused.recv(4096), b""))
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer and b"busy" in answer
        for conn in busy:
            conn.sendall(b"xt\": \"ab\"}")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        for conn in [*silent, valid, *busy, refused]:
            conn.close()


def test_a_flood_of_silent_connections_at_the_file_limit_locks_nobody_out(build_dir, tmp_path):
    """Far more silent connections than the server has file descriptors, accepted in one go: a valid request is
    still answered soon, and the server neither spins on accept() nor logs a traceback per attempt."""
    build, _ = build_dir
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    limit = 64  # descriptors, hard limit too: `planer serve` raises the soft one to the hard one
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "planer", "serve", str(build), "--port", str(port), "--threads", "1",
             "--body-timeout-s", "60"], stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    url = f"http://127.0.0.1:{port}"
    silent = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        # a burst, each beginning its headers, while the server runs: it accepted them faster than it closed any
        silent = [_raw(url, b"POST /v1/score HTTP/1.1\r\nHost: x\r\n") for _ in range(3 * limit)]
        time.sleep(0.5)
        assert httpx.post(url + "/v1/score", json={"text": "answered"}, timeout=10).status_code == 200
        server.send_signal(signal.SIGSTOP)  # the connections wait in the backlog, to be accepted in one go
        silent += [_raw(url, b"") for _ in range(3 * limit)]
        cpu = _cpu_seconds(server.pid)
        server.send_signal(signal.SIGCONT)  # those over the limit are closed unanswered; accepting pauses 1 s
        time.sleep(1.2)
        for _ in range(limit):  # more, one by one: they would take any descriptor left
            silent.append(_raw(url, b""))
            time.sleep(0.005)
        started = time.monotonic()
        answer = httpx.post(url + "/v1/score", json={"text": "still answered"}, timeout=10)
        assert answer.status_code == 200 and time.monotonic() - started < 1
        time.sleep(max(0.0, 1 - (time.monotonic() - started)))
        assert _cpu_seconds(server.pid) - cpu < 0.5, "the server spun"
    finally:
        for conn in silent:
            conn.close()
        server.terminate()
        server.wait(30)
    lines = log.read_text().splitlines()
    assert len(lines) < 20 and not any("Traceback" in line for line in lines), lines
    # accepted a few at a time, the surplus closes before the descriptors run out: AcceptGuard is the backstop
    assert sum("out of file descriptors" in line for line in lines) <= 1, lines


def test_out_of_descriptors_the_waiting_connections_are_closed_and_one_line_is_logged_per_interval(caplog):
    from planer.serve.connections import AcceptGuard

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)  # as asyncio's
    waiting = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(3)]
    guard, loop = AcceptGuard(interval_s=60), asyncio.new_event_loop()
    out_of_files = {"message": "socket.accept() out of system resource", "socket": listener,
                    "exception": OSError(errno.EMFILE, "Too many open files")}
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):  # asyncio calls it at every try
                guard(loop, out_of_files)
            guard(loop, {"message": "something else", "exception": ValueError("not ours")})
    finally:
        loop.close()
        listener.close()
    assert all(conn.recv(1) == b"" for conn in waiting)
    ours = [r.getMessage() for r in caplog.records if r.name == "planer.serve"]
    assert len(ours) == 1 and "Too many open files" in ours[0] and "3 connections closed" in ours[0], ours
    assert any(r.name == "asyncio" and "something else" in r.getMessage() for r in caplog.records)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_client_that_disconnects_stops_its_generation(build_dir):
    build, _ = build_dir
    with running(build, max_new_tokens=20000) as url, httpx.Client(base_url=url, timeout=30) as client:
        stopped = abandoned(url, client, "/v1/generate", {"prompt": "going away", "max_tokens": 20000})
        assert stopped < 20000
        assert client.post("/v1/generate", json={"prompt": "still here", "max_tokens": 3}).status_code == 200


def abandoned(url: str, client: httpx.Client, route: str, body: dict) -> float:
    """Sends `body` to `route` on a raw connection, closes it once generation is under way, and checks that the
    engine stops: the request is counted 499 within 5 s and no step runs after that. Returns the steps run
    (the response's first bytes, when any came, are left unread)."""
    def steps() -> float:
        return _metric(client.get("/metrics").text, "planer_batch_size_sum")

    data = json.dumps(body).encode()
    conn = _raw(url, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (route.encode(), len(data), data))
    deadline = time.monotonic() + 20
    while steps() < 20:  # generation is under way
        assert time.monotonic() < deadline, "generation did not start"
        time.sleep(0.02)
    conn.close()
    deadline = time.monotonic() + 5
    while _metric(client.get("/metrics").text, "planer_requests_total", 'code="499"') < 1:
        assert time.monotonic() < deadline, f"generation went on after the client left ({steps():.0f} steps)"
        time.sleep(0.05)
    stopped = steps()
    time.sleep(0.5)
    assert steps() == stopped
    return stopped


def test_unknown_routes_and_methods_answer_json_and_are_counted(build_dir):
    build, _ = build_dir
    with running(build) as url, httpx.Client(base_url=url, timeout=30) as client:
        missing = client.get("/v1/nothing")
        wrong = client.get("/v1/score")
        counted = client.get("/metrics").text
    assert missing.status_code == 404 and "/v1/nothing" in missing.json()["error"]
    assert wrong.status_code == 405 and "GET /v1/score" in wrong.json()["error"] and wrong.headers["allow"] == "POST"
    assert _metric(counted, "planer_requests_total", 'code="404"') == 1
    assert _metric(counted, "planer_requests_total", 'code="405",route="/v1/score"') == 1


@pytest.mark.parametrize("body, words", [
    (b'{"text": "lone \\ud800 surrogate"}', "Unicode text"),  # valid JSON, not encodable text
    (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"text": "' + b"9" * 5000 + b'"}', None),  # a long string is fine; scored
])
def test_pathological_scoring_input_is_answered_without_a_500(build_dir, body, words):
    build, _ = build_dir
    with running(build) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == (200 if words is None else 400), r.text
    assert words is None or words in r.json()["error"]


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 100])
def test_every_temperature_in_the_documented_range_generates(build_dir, temperature):
    build, _ = build_dir
    with running(build) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/generate", json={"prompt": "warm", "max_tokens": 4, "temperature": temperature,
                                              "top_p": 5e-324 if temperature == 100 else 1, "seed": 2**63 - 1})
        greedy = client.post("/v1/generate", json={"prompt": "warm", "max_tokens": 4}).json()["tokens"]
    assert r.status_code == 200, r.text
    assert temperature > 1 or r.json()["tokens"] == greedy  # near 0 is greedy


def test_generated_requests_get_200_400_or_413_never_500(build_dir):
    """Property-based: bodies built from the API's fields with any JSON values, and arbitrary bytes."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    build, _ = build_dir
    text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates included
    scalar = st.none() | st.booleans() | st.integers() | st.floats() | text
    anything = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(text, inner, max_size=3), max_leaves=8)
    fields = ["text", "prompt", "max_tokens", "temperature", "top_p", "seed"]
    loose = st.dictionaries(st.sampled_from(fields + ["extra"]), anything, max_size=4)
    valid = st.fixed_dictionaries({"prompt": text}, optional={
        "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 100), "top_p": st.floats(0, 1, exclude_min=True),
        "seed": st.integers(0, 2**63 - 1) | st.none()})
    bodies = (loose | valid).map(lambda d: json.dumps(d).encode()) | st.binary(max_size=200)
    answered = []
    with running(build, max_new_tokens=8, max_body_bytes=4096) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(route=st.sampled_from(["/v1/score", "/v1/generate"]), body=bodies)
        def answers_sanely(route: str, body: bytes) -> None:
            r = client.post(route, content=body, headers={"content-type": "application/json"})
            assert r.status_code in (200, 400, 413), (route, body[:80], r.status_code, r.text)
            assert "error" in r.json() or r.status_code == 200
            answered.append(r.status_code)

        answers_sanely()
        assert client.get("/healthz").json()["status"] == "ok"
    assert 200 in answered and 400 in answered


def test_an_engine_failure_answers_500_logs_its_cause_and_the_server_goes_on(build_dir, monkeypatch, caplog):
    import planer.serve.app as app

    real = app.load_engine

    def flaky(*args, **kwargs):
        engine = real(*args, **kwargs)
        run, calls = engine.run, {"n": 0}

        def run_once_failing(feeds):
            calls["n"] += 1
            if calls["n"] == 2:  # the first request's step (the first call is the server's start-up check)
                raise RuntimeError("device lost (injected)")
            return run(feeds)

        engine.run = run_once_failing
        return engine

    monkeypatch.setattr(app, "load_engine", flaky)
    build, _ = build_dir
    with running(build) as url, httpx.Client(base_url=url, timeout=30) as client:
        failed = client.post("/v1/score", json={"text": "first"})
        after = client.post("/v1/score", json={"text": "second"})
    assert failed.status_code == 500 and "device lost (injected)" in failed.json()["error"]
    assert after.status_code == 200
    assert any(r.name == "planer.serve" and r.exc_info and "device lost" in str(r.exc_info[1])
               for r in caplog.records), caplog.records


def test_a_web_page_cannot_drive_a_loopback_server(build_dir):
    """Host and Origin name this machine, or the request is refused: otherwise any page the user visits could
    post to the server, and DNS rebinding (evil.example resolved to 127.0.0.1) could read its answers."""
    from planer.serve import allowed_hosts

    build, _ = build_dir
    hosts = allowed_hosts("127.0.0.1")
    assert {"localhost", "127.0.0.1", "::1"} <= set(hosts) and allowed_hosts("0.0.0.0") is None
    assert allowed_hosts("0.0.0.0", ["api.example"]) == ["0.0.0.0", "api.example"]
    body = b'{"text": "hello"}'

    def post(host: bytes, origin: bytes | None = None) -> bytes:
        conn = _raw(url, b"POST /v1/score HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
                    + (b"Origin: " + origin + b"\r\n" if origin else b"") + b"Connection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b"".join(iter(lambda: conn.recv(4096), b""))
        conn.close()
        return answer

    with running(build, allowed_hosts=hosts) as url:
        port = url.rsplit(":", 1)[1].encode()
        assert post(b"127.0.0.1:" + port).startswith(b"HTTP/1.1 200")
        assert post(b"localhost:" + port, b"http://localhost:3000").startswith(b"HTTP/1.1 200")
        assert post(b"[::1]:" + port).startswith(b"HTTP/1.1 200")
        rebound = post(b"evil.example:" + port)
        assert rebound.startswith(b"HTTP/1.1 403") and b"--allow-host" in rebound
        assert post(b"127.0.0.1:" + port, b"https://evil.example").startswith(b"HTTP/1.1 403")
        assert post(b"127.0.0.1:" + port, b"null").startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize("host", ["", "0"])
def test_serve_cli_refuses_a_host_that_binds_everything_silently(build_dir, host):
    build, _ = build_dir
    r = subprocess.run([sys.executable, "-m", "planer", "serve", str(build), "--host", host], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "0.0.0.0" in r.stderr and "Traceback" not in r.stderr


def test_a_client_gone_during_its_body_is_no_engine_failure(build_dir, caplog):
    build, _ = build_dir
    with running(build) as url, httpx.Client(base_url=url, timeout=30) as client:
        conn = _raw(url, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 40\r\n\r\n{\"text\": ")
        time.sleep(0.2)
        conn.close()
        deadline = time.monotonic() + 5
        while _metric(client.get("/metrics").text, "planer_requests_total", 'code="499"') < 1:
            assert time.monotonic() < deadline, client.get("/metrics").text
            time.sleep(0.05)
        metrics = client.get("/metrics").text
    assert _metric(metrics, "planer_requests_total", 'code="500"') == 0
    assert not any(r.exc_info for r in caplog.records if r.name == "planer.serve")


def test_a_client_that_half_closes_after_its_request_is_answered(build_dir):
    """A client that sends its request and then shuts its sending side (as `nc -N` does) waits for the answer."""
    build, _ = build_dir
    body = b'{"text": "hello"}'
    with running(build) as url:
        conn = _raw(url, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        conn.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: conn.recv(4096), b""))  # then the server closes the connection
        conn.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"tokens":' in answer, answer


def test_a_model_that_contradicts_its_arch_json_is_refused_before_serving(build_dir, tmp_path):
    build, model = build_dir
    for name in ("model.onnx", "arch.json"):
        (tmp_path / name).write_bytes((build / name).read_bytes())
    arch = json.loads((build / "arch.json").read_text())
    (tmp_path / "arch.json").write_text(json.dumps(arch | {"vocab_size": arch["vocab_size"] + 8}))
    with pytest.raises(PlanerError, match="arch.json describes"):
        create_app(tmp_path, threads=1)
