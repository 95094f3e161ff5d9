"""keep_freed_memory: a block freed by one step is reused by the next without faulting its pages in again."""
import subprocess
import sys

import pytest

FAULTS_OF_A_64MB_TENSOR = """
import resource, sys, torch
from lorakit.fast import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported"); raise SystemExit
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)  # 64 MiB: 16,384 pages, as big as a step's larger activations
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()  # the first time its pages are new either way
print(min(faults() for _ in range(3)))
"""


def _faults(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", FAULTS_OF_A_64MB_TENSOR, mode], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_freed_memory_is_reused_without_page_faults():
    kept = _faults("keep")
    if kept == "unsupported":
        pytest.skip("this C library has no glibc mallopt (not Linux/glibc)")
    assert int(kept) < 1000  # reused: the pages are already the process's
    assert int(_faults("default")) > 10000  # glibc's default: unmapped on free, faulted in again
