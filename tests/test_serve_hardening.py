"""What a careless or hostile client cannot do to `lorakit serve`: input that used to raise a 500 gets a 4xx
in OpenAI's error shape (lone surrogates, 100,000-deep JSON, n=0 ...); a client that leaves stops its
generation, streamed or not; stalled connections are closed and shutdown waits only so long; the schema
needs the API key; no response shows an absolute server path; tokenizing runs off the event loop."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.test_serve import GREEDY, PROMPTS, assert_error, make_adapter, make_tiny_base


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    base = make_tiny_base(root / "base")
    adapters_dir = root / "adapters"
    legal = make_adapter(base, adapters_dir / "legal", 1)
    return base, adapters_dir, {"legal": legal}


def build(served, api_key=None, **limits):
    from lorakit.serve.app import build_app
    from lorakit.serve.protocol import Limits

    base, adapters_dir, paths = served
    lim = Limits(**{"max_tokens": 64, "max_prompt_tokens": 128, **limits})
    return build_app(str(base), {k: str(v) for k, v in paths.items()}, str(adapters_dir), lim, api_key=api_key,
                     device="cpu", max_batch=8)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(build(served)) as c:
        yield c


def raw(client, route: str, body: str):
    return client.post(route, content=body.encode("utf-8", "surrogatepass"),
                       headers={"content-type": "application/json"})


def test_input_that_used_to_raise_500_gets_a_4xx_in_openai_shape(client):
    good = client.post("/v1/completions", json={"model": "legal", "prompt": PROMPTS[0], **GREEDY}).json()
    completion, chat = "/v1/completions", "/v1/chat/completions"
    cases = [
        (completion, '{"model": "legal", "prompt": "hi \\ud800 there"}', 400),
        (completion, '{"model": "legal", "prompt": ["\\udfff"]}', 400),
        (chat, '{"model": "legal", "messages": [{"role": "user", "content": "\\ud83d"}]}', 400),
        (completion, '{"model": "\\ud800", "prompt": "x"}', 400),
        (completion, '{"model": "legal", "prompt": "x", "stop": "\\udc00"}', 400),
        (completion, '{"\\ud800": 1, "model": "legal", "prompt": "x"}', 400),
        (completion, "[" * 100_000 + "]" * 100_000, 400),
        (completion, '{"model": "legal", "prompt": "x", "extra": ' + "[" * 40 + "]" * 40 + "}", 400),
        (completion, '{"model": "legal", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}", 400),
        (completion, '{"model": "legal", "prompt": "x", "n": 0}', 400),
        (completion, '{"model": "legal", "prompt": "x", "n": 1.5}', 400),
        (completion, '{"model": "legal", "prompt": "x", "n": true}', 400),
        (completion, '{"model": "legal", "prompt": "x", "best_of": 0}', 400),
        (completion, '{"model": "legal", "prompt": "x", "logprobs": 0}', 400),
        (completion, '{"model": "legal", "prompt": "x", "echo": 0}', 400),
        (completion, b'\xff\xfe{'.decode("latin-1"), 400),
        ("/v1/adapters", '{"name": "legal2\\n", "path": "legal"}', 400),
        ("/v1/adapters", '{"name": "a.b", "path": "legal"}', 400),
        ("/v1/adapters", '{"name": "train", "path": "legal"}', 400),
        ("/v1/adapters", '{"name": "weight", "path": "legal"}', 400),
        ("/v1/adapters", '{"name": "ok", "path": "legal\\u0000"}', 400),
        ("/v1/adapters", '{"name": "ok", "path": "\\ud800"}', 400),
    ]
    for route, body, status in cases:
        r = raw(client, route, body)
        assert_error(r, status)
        assert r.headers["content-type"] == "application/json", body[:60]
    ok = client.post("/v1/completions", json={"model": "legal", "prompt": PROMPTS[0], **GREEDY, "n": 1, "best_of": 1,
                                              "echo": False, "presence_penalty": 0.0, "logit_bias": {}})
    assert ok.status_code == 200 and ok.json()["choices"] == good["choices"]  # neutral values stay accepted


def test_a_vanishing_temperature_samples_greedily_instead_of_failing(client):
    greedy = client.post("/v1/completions", json={"model": "legal", "prompt": PROMPTS[1], **GREEDY}).json()
    tiny = client.post("/v1/completions", json={"model": "legal", "prompt": PROMPTS[1], "max_tokens": 12,
                                                "temperature": 1e-300, "seed": 1})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_no_absolute_server_path_in_models_or_errors(client, served):
    base, adapters_dir, _ = served
    root = str(adapters_dir.parent)
    responses = [client.get("/v1/models"),
                 client.post("/v1/completions", json={"model": "nope", "prompt": "x"}),
                 client.post("/v1/adapters", json={"name": "x1", "path": "../base"}),
                 client.post("/v1/adapters", json={"name": "x2", "path": "missing"})]
    loaded = client.post("/v1/adapters", json={"name": "again", "path": "legal"})
    responses += [loaded, client.get("/v1/models"), client.delete("/v1/adapters/again")]
    assert loaded.json()["root"] == "legal"
    for r in responses:
        assert root not in r.text, r.text
    listed = {m["id"]: m["root"] for m in responses[0].json()["data"]}
    assert listed == {"base": base.name, "legal": "legal"}


def test_the_schema_needs_the_key_when_one_is_set(served):
    with TestClient(build(served)) as open_client:
        spec = open_client.get("/openapi.json").json()
        assert "requestBody" in spec["paths"]["/v1/completions"]["post"]
        assert open_client.get("/docs").status_code == 200
        app = open_client.app
    from lorakit.serve.app import create_app

    keyed = create_app(app.state.engine, app.state.registry, app.state.limits, "tiny", api_key="s3cret")
    with TestClient(keyed) as c:
        assert_error(c.get("/openapi.json"), 401)
        assert c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()["paths"] == spec["paths"]
        for route in ("/docs", "/redoc"):
            assert_error(c.get(route), 404)
        assert c.get("/health").status_code == 200


class _RecordingTokenizer:
    """The engine's tokenizer, noting the threads that tokenize and render chat templates."""

    def __init__(self, inner):
        self._inner, self.threads = inner, set()

    def __call__(self, *args, **kwargs):
        self.threads.add(threading.current_thread().name)
        return self._inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.threads.add(threading.current_thread().name)
        return self._inner.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_tokenizing_and_chat_templates_run_off_the_event_loop(served):
    with TestClient(build(served)) as c:
        engine = c.app.state.engine
        engine.tokenizer = recorder = _RecordingTokenizer(engine.tokenizer)
        assert c.post("/v1/completions", json={"model": "legal", "prompt": "x", **GREEDY}).status_code == 200
        body = {"model": "legal", "messages": [{"role": "user", "content": "x"}], **GREEDY}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
    assert recorder.threads and all(t.startswith("lorakit-tokenize") for t in recorder.threads), recorder.threads


def _slowed(engine, seconds: float) -> None:
    """Each decode step of `engine` takes at least `seconds` (so a generation outlasts a client's patience)."""
    decode = engine._decode

    def slow(seqs):
        time.sleep(seconds)
        decode(seqs)
    engine._decode = slow


def _wait_idle(engine, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while engine.load() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_client_leaving_a_plain_request_cancels_its_generation(served):
    from lorakit.serve.server import serve_in_background

    app = build(served, max_tokens=200)
    engine = app.state.engine
    _slowed(engine, 0.01)
    body = {"model": "legal", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}
    with serve_in_background(app) as url:
        before = engine.steps
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)  # gives up, and hangs up
        _wait_idle(engine)
        assert engine.load() == 0 and engine.steps - before < 120, engine.steps - before  # stopped early
        r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (reads end, or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_stalled_connections_are_closed_and_the_server_keeps_serving(served):
    from lorakit.serve.server import serve_in_background

    app = build(served)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with serve_in_background(app, stall_timeout=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        stalls = {"silent": b"", "half a head": head, "half a body": head + b"Content-Length: 100\r\n\r\n{\"mo"}
        sockets = {}
        for name, sent in stalls.items():
            sockets[name] = socket.create_connection(("127.0.0.1", port))
            sockets[name].sendall(sent)
        start = time.monotonic()
        for name, sock in sockets.items():
            with sock:
                assert _closed_within(sock, 10), f"{name}: still open"
        assert time.monotonic() - start < 8
        with httpx.Client(base_url=url, timeout=60) as http:  # a slow but steady client is not cut off
            for _ in range(3):
                assert http.post("/v1/completions", json={"model": "legal", "prompt": "x", **GREEDY}).status_code == 200
                time.sleep(0.3)
        _wait_idle(app.state.engine)
        assert app.state.engine.load() == 0


def test_shutdown_waits_for_requests_in_flight_only_so_long(served):
    from lorakit.serve.server import serve_in_background

    app = build(served)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    with socket.socket() as sock:
        with serve_in_background(app, stall_timeout=120, shutdown_timeout=0.5) as url:
            sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            sock.sendall(head)  # a request that will never finish arriving
            time.sleep(0.2)
            start = time.monotonic()
        assert time.monotonic() - start < 10  # not the 120 s the stalled request could hold it


def test_errors_stay_valid_json_whatever_they_quote(client):
    r = client.post("/v1/completions", json={"model": "é" * 10 + "'\"\\", "prompt": "x"})
    assert_error(r, 404, "model")
    assert json.loads(r.content.decode("ascii"))["error"]["message"].startswith("the model")
