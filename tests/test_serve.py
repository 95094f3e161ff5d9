"""`lorakit serve` over HTTP on a tiny random Llama with two adapters: exact greedy text alone vs in mixed
concurrent batches, streaming, /v1/models, run-time loading confined to the adapters folder, limits and
OpenAI-shaped 4xx errors after which the server keeps answering."""
from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path
from unittest.mock import ANY

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tests.test_train_fixtures import write_tiny_model_dir


TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
GREEDY = {"temperature": 0, "max_tokens": 12}


def make_tiny_base(folder):
    """A random 2-layer Llama and its tokenizer saved as a transformers folder."""
    return Path(write_tiny_model_dir(folder, max_position_embeddings=256))


def make_adapter(base_dir, out, seed: int, r: int = 4, targets=TARGETS):
    """A random, non-zero LoRA adapter for the tiny base, saved in PEFT format."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)  # large enough that each adapter changes the greedy text
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base folder, adapters folder, {name: adapter folder}, an extra adapter for run-time loading)."""
    root = tmp_path_factory.mktemp("serve")
    base = make_tiny_base(root / "base")
    adapters_dir = root / "adapters"
    paths = {"legal": make_adapter(base, adapters_dir / "legal", 1),
             "medical": make_adapter(base, adapters_dir / "medical", 2, r=8, targets=["q_proj", "k_proj", "gate_proj"])}
    make_adapter(base, adapters_dir / "finance", 3)
    make_adapter(base, root / "outside", 4)
    return base, adapters_dir, paths


def build(served, **limits):
    from lorakit.serve.app import build_app
    from lorakit.serve.protocol import Limits

    base, adapters_dir, paths = served
    lim = Limits(**{"max_tokens": 64, "max_prompt_tokens": 128, "max_concurrent": 64, **limits})
    return build_app(str(base), {k: str(v) for k, v in paths.items()}, str(adapters_dir), lim, device="cpu",
                     max_batch=8)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(build(served)) as c:
        yield c


def complete(client, model, prompt, **extra):
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, **GREEDY, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


PROMPTS = ["What is the name of our company?", "Give three tips", "The quick brown fox", "Say hello.",
           "Our company is called", "Eat well, sleep enough"]
MODELS = ["legal", "medical", "base"]


def test_adapters_change_the_text_and_models_lists_them(client):
    texts = {m: complete(client, m, PROMPTS[0]) for m in MODELS}
    assert len(set(texts.values())) == 3, texts  # each adapter really changes the output
    listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert listed == ["base", "legal", "medical"]


def test_concurrent_mixed_requests_equal_each_alone(served):
    """The acceptance check: on a real uvicorn server, 18 concurrent requests across two adapters and the
    base return exactly the greedy text each returns when sent alone."""
    from lorakit.serve.server import serve_in_background

    app = build(served)
    jobs = [(MODELS[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(18)]
    with serve_in_background(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        alone = {job: complete(http, *job) for job in set(jobs)}
        app.state.engine.max_rows_seen = 0
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            together = list(pool.map(lambda job: complete(http, *job), jobs))
    assert together == [alone[job] for job in jobs]
    assert app.state.engine.max_rows_seen >= 3, "the requests were never batched together"


def test_chat_template_and_streaming(client):
    body = {"model": "legal", "messages": [{"role": "user", "content": "Say hello."}], **GREEDY}
    full = client.post("/v1/chat/completions", json=body).json()
    assert full["object"] == "chat.completion" and full["choices"][0]["message"]["role"] == "assistant"
    assert full["usage"]["prompt_tokens"] > 5  # the ChatML template wrapped the message
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == full["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == full["usage"]


def test_completion_stream_matches_plain_and_stop_strings(client):
    plain = complete(client, "medical", PROMPTS[1])
    with client.stream("POST", "/v1/completions",
                       json={"model": "medical", "prompt": PROMPTS[1], "stream": True, **GREEDY}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == plain
    stop = plain[3:5]
    cut = client.post("/v1/completions", json={"model": "medical", "prompt": PROMPTS[1], "stop": stop, **GREEDY}).json()
    assert cut["choices"][0]["text"] == plain[:plain.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"


def test_malformed_requests_get_4xx_and_the_next_request_is_served(client):
    good = complete(client, "legal", PROMPTS[2])
    bad = [
        (client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400, None),
        (client.post("/v1/completions", json={"model": "legal", **GREEDY}), 400, "prompt"),
        (client.post("/v1/completions", json={"prompt": "x", **GREEDY}), 400, "model"),
        (client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model"),
        (client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 10**9}), 400,
         "max_tokens"),
        (client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 0}), 400, "max_tokens"),
        (client.post("/v1/completions", json={"model": "legal", "prompt": "x", "temperature": 7}), 400, "temperature"),
        (client.post("/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": "5"}), 400, "max_tokens"),
        (client.post("/v1/completions", json={"model": "legal", "prompt": "x", "n": 3}), 400, "n"),
        (client.post("/v1/completions", json={"model": "legal", "prompt": [10**9]}), 400, "prompt"),
        (client.post("/v1/completions", json={"model": "legal", "prompt": "word " * 500}), 400, "prompt"),
        (client.post("/v1/completions", json=["a list"]), 400, None),
        (client.post("/v1/chat/completions", json={"model": "legal", "messages": [{"role": "robot", "content": "x"}]}),
         400, "messages[0].role"),
        (client.post("/v1/chat/completions", json={"model": "legal", "messages": []}), 400, "messages"),
        (client.post("/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"}),
         413, None),
        (client.get("/v1/nothing-here"), 404, None),
    ]
    for response, status, param in bad:
        assert_error(response, status, param)
    assert complete(client, "legal", PROMPTS[2]) == good


def test_runtime_adapter_loading_is_confined_to_the_adapters_folder(client, served):
    base, adapters_dir, _ = served
    outside = adapters_dir.parent / "outside"
    os.symlink(outside, adapters_dir / "sneaky", target_is_directory=True)
    refused = [
        ({"name": "x1", "path": "../outside"}, 403),
        ({"name": "x2", "path": str(outside)}, 403),
        ({"name": "x3", "path": "sneaky"}, 403),
        ({"name": "x4", "path": "finance/../../outside"}, 403),
        ({"name": "x5", "path": "missing"}, 404),
        ({"name": "../evil", "path": "finance"}, 400),
        ({"name": "base", "path": "finance"}, 400),
        ({"name": "legal", "path": "finance"}, 409),
        ({"name": "x6"}, 400),
    ]
    for body, status in refused:
        assert_error(client.post("/v1/adapters", json=body), status)
    assert "x1" not in [m["id"] for m in client.get("/v1/models").json()["data"]]

    loaded = client.post("/v1/adapters", json={"name": "finance", "path": "finance"})
    assert loaded.status_code == 200, loaded.text
    text = complete(client, "finance", PROMPTS[0])
    assert text != complete(client, "base", PROMPTS[0])
    assert client.delete("/v1/adapters/finance").json()["deleted"] is True
    assert_error(client.post("/v1/completions", json={"model": "finance", "prompt": "x"}), 404, "model")
    assert_error(client.delete("/v1/adapters/finance"), 404)
    absolute = client.post("/v1/adapters", json={"name": "finance", "path": str(adapters_dir / "finance")})
    assert absolute.status_code == 200, absolute.text
    assert complete(client, "finance", PROMPTS[0]) == text  # reloaded under the same name: same adapter again
    client.delete("/v1/adapters/finance")


def test_api_key_and_concurrency_limit(served):
    from lorakit.serve.app import create_app

    with TestClient(build(served)) as open_client:
        app = open_client.app
    keyed = create_app(app.state.engine, app.state.registry, app.state.limits, "tiny", api_key="s3cret")
    with TestClient(keyed) as c:
        assert_error(c.get("/v1/models"), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200
    app.state.limits.max_concurrent = 0  # every request now exceeds the limit
    with TestClient(app) as c:
        assert_error(c.post("/v1/completions", json={"model": "base", "prompt": "x"}), 429)


def test_load_test_200_requests_at_concurrency_16_no_errors_none_lost(served):
    from lorakit.serve.server import serve_in_background

    app = build(served)
    with serve_in_background(app) as url, httpx.Client(base_url=url, timeout=60,
                                                       limits=httpx.Limits(max_connections=16)) as http:
        def one(i):
            body = {"model": MODELS[i % 3], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4, "temperature": 0,
                    "stream": i % 5 == 0}
            r = http.post("/v1/completions", json=body)
            return r.status_code, r.text
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(200)))
    assert [s for s, _ in results if s != 200] == []
    assert len(results) == 200 and all(("[DONE]" in t) if i % 5 == 0 else ('"choices"' in t)
                                       for i, (_, t) in enumerate(results))


def test_lorakit_serve_command_in_a_subprocess(served):
    import socket
    import subprocess
    import sys
    import time

    base, _, paths = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(base), "--adapter", f"legal={paths['legal']}",
           "--port", str(port), "--device", "cpu", "--api-key", "k3y", "--stall-timeout", "120",
           "--shutdown-timeout", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth).json()["data"]] == ["base", "legal"]
        r = httpx.post(f"{url}/v1/completions", headers=auth, timeout=60,
                       json={"model": "legal", "prompt": PROMPTS[0], **GREEDY})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        with socket.create_connection(("127.0.0.1", port)) as stalled:  # a request that never finishes arriving
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{")
            time.sleep(0.2)
            start = time.monotonic()
            proc.terminate()  # SIGTERM: --shutdown-timeout 1 bounds the wait for it (--stall-timeout is 120 s)
            proc.wait(timeout=30)
            assert time.monotonic() - start < 15
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_client_leaving_mid_stream_cancels_its_generation(served):
    from lorakit.serve.server import serve_in_background

    app = build(served, max_tokens=200)
    engine = app.state.engine
    body = {"model": "legal", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}
    with serve_in_background(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        full = http.post("/v1/completions", json=body).json()
        assert full["usage"]["completion_tokens"] == 200  # runs to max_tokens when nobody hangs up
        before = engine.steps
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            next(r.iter_lines())  # the first chunk arrived; now hang up
        for _ in range(500):
            if engine.load() == 0:
                break
            time.sleep(0.02)
        assert engine.load() == 0 and engine.steps - before < 150  # stopped well before max_tokens
        assert http.post("/v1/completions", json=body).json() == {**full, "id": ANY, "created": ANY}


def test_serve_refuses_adapter_names_requests_could_not_use_before_loading_the_model(tmp_path):
    from lorakit.cli.serve import ServeOptions
    from lorakit.errors import ConfigError

    (tmp_path / "adapter_config.json").write_text("{}")
    for entry, reason in [(f"base={tmp_path}", "'base' names the base model"),
                          (f"../x={tmp_path}", "cannot name an adapter"),
                          (f"tiny={tmp_path}", "is the base model's name"),
                          (f"a={tmp_path} a={tmp_path}", "used twice")]:
        with pytest.raises(ConfigError, match=reason):
            ServeOptions(model="some/tiny", adapter=entry.split()).validate()
