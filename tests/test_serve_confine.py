"""POST /v1/adapters reads only from inside the adapters folder, whatever happens on disk meanwhile: a symlink
swapped between inside and outside while adapters load never gets outside weights loaded (the race probe),
symlinks that stay inside still work, and paths that cannot name a folder (NUL bytes, over-long names,
symlink loops, a FIFO) get a 4xx, never a 500 and never a server path in the message."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tests.test_serve import GREEDY, PROMPTS, assert_error, make_adapter, make_tiny_base

TRIES = 150  # loads raced against a symlink swapper, per kind of swap


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base folder, adapters folder holding `finance`, an adapter folder outside it)."""
    root = tmp_path_factory.mktemp("confine")
    base = make_tiny_base(root / "base")
    adapters_dir = root / "adapters"
    make_adapter(base, adapters_dir / "finance", 3)
    make_adapter(base, root / "outside", 4)  # same rank and targets as finance: only its weights differ
    return base, adapters_dir, root / "outside"


@pytest.fixture(scope="module")
def client(folders):
    from lorakit.serve.app import build_app
    from lorakit.serve.protocol import Limits

    base, adapters_dir, _ = folders
    with TestClient(build_app(str(base), {}, str(adapters_dir), Limits(max_tokens=16), device="cpu")) as c:
        yield c


def adapter_sum(client, name: str) -> float:
    """A fingerprint of the weights loaded as adapter `name`."""
    model = client.app.state.engine.model
    return sum(float(p.double().sum()) for n, p in model.named_parameters() if f".{name}." in n)


def file_sum(folder: Path) -> float:
    from safetensors.torch import load_file

    return sum(float(t.double().sum()) for t in load_file(folder / "adapter_model.safetensors").values())


def swapping(link: Path, targets: list[str], stop: threading.Event) -> threading.Thread:
    """A thread that points `link` at each of `targets` in turn, atomically (a new symlink renamed over it)."""
    if not link.is_symlink():
        os.symlink(targets[0], link)

    def run():
        i = 1
        while not stop.is_set():
            tmp = link.with_name(f".{link.name}.{i % 2}")
            tmp.unlink(missing_ok=True)
            os.symlink(targets[i % len(targets)], tmp)
            os.replace(tmp, link)
            i += 1
    return threading.Thread(target=run, daemon=True)


def race(client, path: str, link: Path, targets: list[str], inside: float, tries: int) -> dict[str, int]:
    """Load `path` `tries` times while `link` flips between `targets`; counts of what each load got (`inside`:
    the fingerprint of the weights inside)."""
    counts = {"inside": 0, "outside": 0, "refused": 0}
    stop = threading.Event()
    thread = swapping(link, targets, stop)
    thread.start()
    try:
        for i in range(tries):
            r = client.post("/v1/adapters", json={"name": f"race{i}", "path": path})
            if r.status_code != 200:
                assert r.status_code in (403, 404), r.text
                assert_error(r, r.status_code, "path")
                counts["refused"] += 1
                continue
            got = adapter_sum(client, f"race{i}")
            counts["inside" if abs(got - inside) < 1e-6 * max(1.0, abs(inside)) else "outside"] += 1
            assert client.delete(f"/v1/adapters/race{i}").status_code == 200
    finally:
        stop.set()
        thread.join()
    return counts


def test_race_probe_a_swapped_weights_file_symlink_never_loads_outside_weights(client, folders):
    _, adapters_dir, outside = folders
    folder = adapters_dir / "race-file"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((adapters_dir / "finance" / "adapter_config.json").read_bytes())
    link = folder / "adapter_model.safetensors"
    counts = race(client, "race-file", link, ["../finance/adapter_model.safetensors",
                                               str(outside / "adapter_model.safetensors")],
                  file_sum(adapters_dir / "finance"), TRIES)
    assert counts["outside"] == 0, counts
    assert counts["inside"] > 0 and counts["inside"] + counts["refused"] == TRIES, counts


def test_race_probe_a_swapped_folder_symlink_never_loads_outside_weights(client, folders):
    _, adapters_dir, outside = folders
    counts = race(client, "race-dir", adapters_dir / "race-dir", ["finance", str(outside)],
                  file_sum(adapters_dir / "finance"), TRIES)
    assert counts["outside"] == 0, counts
    assert counts["inside"] > 0 and counts["inside"] + counts["refused"] == TRIES, counts


def test_symlinks_that_stay_inside_the_folder_load(client, folders):
    _, adapters_dir, outside = folders
    os.symlink("finance", adapters_dir / "latest")
    os.symlink(str(adapters_dir / "finance"), adapters_dir / "absolute-latest")
    (adapters_dir / "nested" / "deeper").mkdir(parents=True)
    os.symlink("../../finance", adapters_dir / "nested" / "deeper" / "up")
    expected = file_sum(adapters_dir / "finance")
    for name, path in [("via-link", "latest"), ("via-absolute-link", "absolute-latest"),
                       ("via-dotdot", "nested/deeper/up"), ("via-absolute", str(adapters_dir / "finance"))]:
        r = client.post("/v1/adapters", json={"name": name, "path": path})
        assert r.status_code == 200, r.text
        assert abs(adapter_sum(client, name) - expected) < 1e-6 * max(1.0, abs(expected))
        client.delete(f"/v1/adapters/{name}")


def test_paths_that_cannot_name_a_folder_get_4xx_without_server_paths(client, folders):
    base, adapters_dir, outside = folders
    os.symlink("loop-b", adapters_dir / "loop-a")
    os.symlink("loop-a", adapters_dir / "loop-b")
    os.symlink("self", adapters_dir / "self")
    os.mkfifo(adapters_dir / "fifo")
    (adapters_dir / "fifo-adapter").mkdir()
    os.mkfifo(adapters_dir / "fifo-adapter" / "adapter_config.json")
    (adapters_dir / "plain-file").write_text("{}")
    (adapters_dir / "empty").mkdir()
    cases = [
        ("bad\x00name", 400), ("x" * 300, 400), ("a/" * 3000, 400), ("loop-a", 400), ("self/x", 400),
        ("fifo", 404), ("fifo-adapter", 400), ("plain-file", 404), ("plain-file/x", 404), ("empty", 400),
        ("missing", 404), ("..", 403), ("finance/../..", 403), (str(outside), 403), ("/", 403),
        ("finance/../../outside", 403),
    ]
    for path, status in cases:
        r = client.post("/v1/adapters", json={"name": "probe", "path": path})
        assert_error(r, status, "path")
        message = r.json()["error"]["message"].replace(path, "")  # (the client's own path may be echoed)
        assert str(adapters_dir.parent) not in message and str(base) not in message, message
    assert "probe" not in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_a_load_that_fails_leaves_the_model_as_it_was(client, folders, tmp_path):
    """An adapter whose tensors do not fit is refused with 400, and the base model's text is unchanged,
    including the first load onto a server that started with no adapter (the plain model gets wrapped)."""
    base, adapters_dir, _ = folders
    before = client.post("/v1/completions", json={"model": "base", "prompt": PROMPTS[0], **GREEDY}).json()
    wrong = adapters_dir / "wrong-shapes"
    make_adapter(base, wrong, 5)
    from safetensors.torch import load_file, save_file

    tensors = load_file(wrong / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in tensors.items()},
              wrong / "adapter_model.safetensors")
    r = client.post("/v1/adapters", json={"name": "wrong", "path": "wrong-shapes"})
    assert_error(r, 400, "path")
    assert "lorakit-adapter-" not in r.text and str(adapters_dir) not in r.text, r.text  # no server paths
    after = client.post("/v1/completions", json={"model": "base", "prompt": PROMPTS[0], **GREEDY}).json()
    assert after["choices"] == before["choices"]
    assert "wrong" not in getattr(client.app.state.engine.model, "peft_config", {})
