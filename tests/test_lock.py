"""The install is the lock: what `make test` runs in is exactly requirements/lock.txt + models.txt + export-test.txt, and a lock
that no longer matches pyproject.toml is refused with the command that refreshes it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCKS = [ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "models.txt",
         ROOT / "requirements" / "export-test.txt"]  # the last installed by `make test` only (it compiles llama.cpp)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
    pins = {}
    for lock in LOCKS:
        for line in lock.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            if m:
                pins[_canonical(m.group(1))] = m.group(2)
    return pins


def test_every_locked_requirement_is_hashed():
    for lock in LOCKS:
        entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
        pins = [e for e in entries if re.match(r"^[A-Za-z0-9].*==", e)]
        assert pins, f"{lock} locks nothing"
        unhashed = [e.split()[0] for e in pins if "--hash=sha256:" not in e]
        assert not unhashed, f"{lock.name}: pinned without a hash: {unhashed}"


@pytest.mark.skipif(bool(os.environ.get("LORAKIT_UNLOCKED")), reason="make test-latest / test-transformers: not the lock")
def test_the_environment_is_exactly_the_lock():
    """Every distribution installed is in the lock at its locked version, and every locked one is installed
    (pip itself and lorakit aside), the same thing `pip freeze` shows."""
    locked = _locked()
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    installed = {}
    for dist in metadata.distributions():  # those in the environment's site-packages (not a package's vendored copies)
        name = dist.metadata["Name"]
        if name and Path(dist.locate_file("")).resolve() in site:
            installed[_canonical(name)] = dist.version
    installed.pop("lorakit", None)
    installed.pop("pip", None)
    wrong = {n: (v, locked.get(n)) for n, v in installed.items() if locked.get(n) != v}
    missing = sorted(set(locked) - set(installed))
    assert not wrong, f"installed (version, locked version) differ from the lock: {wrong}; run `make install`"
    assert not missing, f"locked but not installed: {missing}; run `make test` (it installs all three locks)"


def _copy_project(tmp_path: Path) -> Path:
    for rel in ("tools/lock.py", "pyproject.toml", "requirements/lock.txt", "requirements/models.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "tools" / "lock.py"), "check"], capture_output=True, text=True)


def test_the_committed_lock_is_fresh(tmp_path):
    assert _check(_copy_project(tmp_path)).returncode == 0


@pytest.mark.parametrize("edit", [
    ('"tqdm",', '"tqdm>=99",'),                       # a range tightened
    ('"pyyaml",', '"pyyaml",\n    "rich",'),         # a dependency added
    ('"pytest>=8", ', ''),                            # a test dependency removed
    ('requires = ["setuptools>=77"]', 'requires = ["setuptools>=80"]'),  # the build's requirements
])
def test_a_changed_requirement_makes_the_lock_stale(tmp_path, edit):
    root = _copy_project(tmp_path)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    assert edit[0] in text
    pyproject.write_text(text.replace(edit[0], edit[1], 1))
    done = _check(root)
    assert done.returncode == 1
    assert "requirements/lock.txt is stale" in done.stderr and "make lock" in done.stderr


def test_a_comment_in_pyproject_leaves_the_lock_fresh(tmp_path):
    root = _copy_project(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"tqdm",', '"tqdm",  # progress bars', 1))
    assert _check(root).returncode == 0


def test_a_missing_lock_says_how_to_make_it(tmp_path):
    root = _copy_project(tmp_path)
    (root / "requirements" / "models.txt").unlink()
    done = _check(root)
    assert done.returncode == 1 and "models.txt is missing" in done.stderr and "make lock" in done.stderr
