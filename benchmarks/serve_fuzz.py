"""A long property-based fuzzing run of `lorakit serve` from its OpenAPI schema (schemathesis): a real uvicorn
server on loopback, a tiny random model with one adapter, an adapters folder holding awkward entries, and
requests that fit the schema and that break it. The test suite runs a short one (tests/test_serve_fuzz.py).

    python benchmarks/serve_fuzz.py                    # 2,000 requests, about a minute on CPU
    python benchmarks/serve_fuzz.py --requests 10000 --seed 7

Prints the requests sent, the 5xx count and the error responses not in OpenAI's shape (each listed); exits 1
when either count is above 0 or fewer requests than asked went out.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.serve.server import serve_in_background  # noqa: E402
from tests.test_serve_fuzz import FuzzReport, fuzz, make_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests to send (at least 1,000 is the bar)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first round")
    parser.add_argument("--seconds", type=float, default=540, help="stop sending after this long")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorakit-fuzz-") as root:
        app = make_target(Path(root))
        report, start = FuzzReport(), time.monotonic()
        with serve_in_background(app) as url:
            spec, seed = app.openapi(), args.seed
            # A round may stop short of its examples (hypothesis ends when it has seen all it can): go on with
            # the next seed until enough requests went out or the time is up.
            while report.sent < args.requests and time.monotonic() - start < args.seconds:
                fuzz(url, spec, args.requests - report.sent, seed=seed,
                     seconds=args.seconds - (time.monotonic() - start), report=report)
                seed += 1
        elapsed = time.monotonic() - start
    print(f"requests sent: {report.sent} in {elapsed:.0f} s ({report.sent / elapsed:.0f}/s), seeds "
          f"{args.seed}..{seed - 1}")
    print(f"5xx responses: {len(report.server_errors)}")
    print(f"errors not in OpenAI's shape: {len(report.misshapen)}")
    print(f"statuses: {dict(sorted(report.statuses.items()))}")
    for line in report.server_errors[:20] + report.misshapen[:20]:
        print("  ", line)
    if report.server_errors or report.misshapen or report.sent < args.requests:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
