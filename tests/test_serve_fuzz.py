"""Property-based HTTP fuzzing of `lorakit serve` from its own OpenAPI schema (schemathesis): requests that fit
the schema and requests that break it, sent to a real uvicorn server on loopback, must never get a 5xx, and
every refusal must carry OpenAI's error body. A bounded run here; `python benchmarks/serve_fuzz.py` sends
thousands. Half of the generated bodies are aimed: a served `model`, an adapters-folder path from a list of
awkward ones (symlink loops, links out, a FIFO, NUL bytes ...), so the fuzzer reaches generation and
loading, not only the first refusal."""
from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.test_serve import make_adapter, make_tiny_base

AIMED_MODELS = ["base", "legal"]
AIMED_NAMES = ["fresh", "legal", "base", "a.b", "train", "weight", "x" * 65, "ok\n"]
AIMED_PATHS = ["legal", "./legal/", "../outside", "link-out", "loop", "fifo", "missing", "legal/adapter_config.json",
               "legal\x00", "x" * 300, "/", "..", "legal/../../outside", "link-in"]


def make_target(root: Path):
    """The app to fuzz: a tiny base with adapter `legal`, an adapters folder holding awkward entries, and
    small limits so that every accepted request generates quickly."""
    from lorakit.serve.app import build_app
    from lorakit.serve.protocol import Limits

    base = make_tiny_base(root / "base")
    adapters_dir = root / "adapters"
    legal = make_adapter(base, adapters_dir / "legal", 1)
    make_adapter(base, root / "outside", 2)
    os.symlink(root / "outside", adapters_dir / "link-out")
    os.symlink("legal", adapters_dir / "link-in")
    os.symlink("loop", adapters_dir / "loop")
    os.mkfifo(adapters_dir / "fifo")
    limits = Limits(max_tokens=4, max_prompt_tokens=64, max_concurrent=64)
    return build_app(str(base), {"legal": str(legal)}, str(adapters_dir), limits, device="cpu", max_batch=4)


@dataclass
class FuzzReport:
    sent: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)  # "METHOD path -> status: body" of each 5xx
    misshapen: list[str] = field(default_factory=list)  # refusals whose body is not OpenAI's error shape

    def summary(self) -> str:
        return (f"{self.sent} requests sent, {len(self.server_errors)} 5xx, {len(self.misshapen)} errors not in "
                f"OpenAI's shape; statuses {dict(sorted(self.statuses.items()))}")


def openai_error_shape(text: str) -> bool:
    try:
        body = json.loads(text)
    except ValueError:
        return False
    err = body.get("error") if isinstance(body, dict) else None
    return (isinstance(err, dict) and set(body) == {"error"} and set(err) == {"message", "type", "param", "code"}
            and isinstance(err["message"], str) and bool(err["message"]) and isinstance(err["type"], str)
            and all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")))


def fuzz(url: str, spec: dict, requests: int, seed: int = 0, seconds: float = float("inf"),
         report: FuzzReport | None = None) -> FuzzReport:
    """Send up to `requests` schemathesis-generated requests (positive and negative) to the server at `url`,
    stopping early after `seconds`; returns what came back."""
    import requests as http
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    report = report or FuzzReport()
    strategies = []
    for result in schemathesis.openapi.from_dict(spec).get_all_operations():
        operation = result.ok()
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE))
        if operation.body or operation.path_parameters:  # (nothing to break in a route without inputs)
            strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    deadline = time.monotonic() + seconds
    session = http.Session()

    @hypothesis_seed(seed)
    @settings(max_examples=requests, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies), data=st.data())
    def send(case, data):
        if time.monotonic() > deadline:
            return
        _aim(case, data)
        response = case.call(base_url=url, session=session, timeout=60)
        report.sent += 1
        report.statuses[response.status_code] += 1
        where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
        if response.status_code >= 500:
            report.server_errors.append(where)
        if response.status_code >= 400 and not openai_error_shape(response.text):
            report.misshapen.append(where)

    send()
    session.close()
    return report


def _aim(case, data) -> None:
    """Half the time, point a generated body at what exists (a served model, a fresh adapter name) and put
    awkward values where they matter: text the tokenizer sees, tiny temperatures, adapters-folder paths."""
    from hypothesis import strategies as st

    if not isinstance(case.body, dict) or not data.draw(st.booleans(), label="aim"):
        return
    draw = data.draw
    awkward_text = st.text(st.characters(categories=["Cs", "Cc", "Zs", "So", "Lo"]), min_size=1, max_size=12) | \
        st.sampled_from(["\x00", "\ud800", "a " * 3000, "\u202e", "{{ x }}", "<|im_end|>", "\r\n\r\n"])
    if case.path == "/v1/adapters":
        fresh = st.from_regex(r"[a-z][a-z0-9_-]{0,11}", fullmatch=True)
        case.body["name"] = draw(fresh | fresh | fresh | st.sampled_from(AIMED_NAMES), label="name")
        case.body["path"] = draw(st.sampled_from(AIMED_PATHS) | awkward_text, label="path")
        return
    case.body["model"] = draw(st.sampled_from(AIMED_MODELS), label="model")
    if draw(st.booleans(), label="awkward text"):
        text = draw(awkward_text, label="text")
        if case.path == "/v1/completions":
            case.body["prompt"] = text
        else:
            case.body["messages"] = [{"role": draw(st.sampled_from(["user", "system", "assistant"])), "content": text}]
    if draw(st.booleans(), label="awkward temperature"):
        case.body["temperature"] = draw(st.sampled_from([5e-324, 1e-300, 1e-45, 2.0]) | st.floats(0, 2), label="t")


def test_fuzzing_from_the_openapi_schema_finds_no_5xx_and_only_openai_shaped_errors(tmp_path):
    pytest.importorskip("schemathesis")
    from lorakit.serve.server import serve_in_background

    app = make_target(tmp_path)
    with serve_in_background(app) as url:
        report = fuzz(url, app.openapi(), requests=400, seed=24, seconds=40)
        engine = app.state.engine
        for _ in range(500):
            if engine.load() == 0:
                break
            time.sleep(0.02)
    assert report.sent >= 100, report.summary()
    assert not report.server_errors, "\n".join([report.summary()] + report.server_errors[:5])
    assert not report.misshapen, "\n".join([report.summary()] + report.misshapen[:5])
    assert report.statuses[200] > 0 and engine.load() == 0, report.summary()
