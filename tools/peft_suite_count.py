"""Count how much of PEFT's own LoRA test suite lorakit passes (issue 23), for docs/BENCHMARKS.md.

Runs ../shared/peft-suite/run.sh (lorakit, and with --control real peft too; ~35 + ~25 minutes on 2 cores) and
prints one markdown table: collected / passed / failed / error / skipped / needs network per run, lorakit's share
of the tests real peft passes (all of them, and outside the research variants lorakit refuses by design), and how
many of those fail with an AttributeError/TypeError crash (the acceptance criterion: none).

    python tools/peft_suite_count.py                 # lorakit run; the control's results reused if present
    python tools/peft_suite_count.py --control       # both runs
    python tools/peft_suite_count.py --no-run        # count what the last run left in the work folder
    python tools/peft_suite_count.py --files test_low_level_api.py -k dora   # a subset (quick check)
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO.parent / "shared" / "peft-suite"
OUTCOMES = ("passed", "failed", "error", "skipped", "needs-network")
REFUSED_VARIANTS = re.compile(r"use_bdlora|velora_config|kasa_config|monteclora_config|alora_invocation_tokens|got 'mica'|"
                              r"init_lora_weights='mica'")
"""The research variants lorakit refuses by name (a test whose failure is that refusal is counted apart)."""


def outcomes(path: Path) -> dict[str, tuple[str, dict]]:
    """{test id: (outcome, the report that decided it)} from run.sh's results_<run>.jsonl (summarize.py's rules)."""
    reports = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        reports[re.sub(r"^suite_\w+/", "", r["nodeid"])].append(r)
    out = {}
    for nid, reps in reports.items():
        by = {r["when"]: r for r in reps}
        failed = [r for r in reps if r["outcome"] == "failed"]
        if any(r.get("network") for r in failed):
            out[nid] = ("needs-network", failed[0])
        elif by.get("setup", {}).get("outcome") == "failed" or by.get("teardown", {}).get("outcome") == "failed":
            out[nid] = ("error", by.get("setup", by.get("teardown")))
        elif by.get("call", {}).get("outcome") == "failed":
            out[nid] = ("failed", by["call"])
        elif any(r["outcome"] == "skipped" for r in reps):
            out[nid] = ("skipped", {})
        else:
            out[nid] = ("passed", by.get("call", {}))
    return out


def table(runs: dict[str, dict]) -> str:
    lines = ["| run | collected | " + " | ".join(OUTCOMES) + " |", "|---|---|" + "---|" * len(OUTCOMES)]
    for name, res in runs.items():
        counts = collections.Counter(o for o, _ in res.values())
        lines.append(f"| {name} | {len(res)} | " + " | ".join(str(counts[k]) for k in OUTCOMES) + " |")
    return "\n".join(lines)


def share(peft: dict, lorakit: dict) -> str:
    """lorakit's passes among the tests real peft passes, and the crashes among them."""
    theirs = [nid for nid, (o, _) in peft.items() if o == "passed"]
    ours = {nid: lorakit.get(nid, ("absent", {})) for nid in theirs}
    refused = {nid for nid, (o, info) in ours.items() if o != "passed"
               and REFUSED_VARIANTS.search(str(info.get("msg", "")))}
    passed = sum(o == "passed" for o, _ in ours.values())
    crashes = sum(o in ("failed", "error") and info.get("exc_type", "").split(".")[-1] in ("AttributeError",
                                                                                            "TypeError")
                  for o, info in ours.values())
    inside = len(theirs) - len(refused)
    whole = 100 * passed / max(1, len(theirs))
    return (f"lorakit passes {passed} of the {len(theirs)} tests real peft passes ({whole:.1f}%);"
            f" outside the {len(refused)} that test refused research variants: {passed} of {inside} "
            f"({100 * passed / max(1, inside):.1f}%). AttributeError/TypeError crashes among them: {crashes}.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--control", action="store_true", help="also run real peft (the control), ~25 more minutes")
    ap.add_argument("--no-run", action="store_true", help="only count the results already in the work folder")
    ap.add_argument("--work", default=os.environ.get("PEFT_SUITE_WORK", "/tmp/peft-suite"),
                    help="run.sh's work folder (PEFT_SUITE_WORK)")
    ap.add_argument("--files", help="test files to run (run.sh's FILES), e.g. test_low_level_api.py")
    ap.add_argument("-k", dest="keyword", help="a pytest -k expression: a subset")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if not args.no_run:
        if not (SUITE / "run.sh").is_file():
            sys.exit(f"{SUITE / 'run.sh'} not found: this needs the shared peft-suite folder beside the checkout")
        env = dict(os.environ, PEFT_SUITE_WORK=str(work), OMP_NUM_THREADS="1")
        if args.files:
            env["FILES"] = args.files
        if args.keyword:  # (run.sh splits EXTRA_ARGS on spaces; PYTEST_ADDOPTS keeps the expression whole)
            env["PYTEST_ADDOPTS"] = f"{env.get('PYTEST_ADDOPTS', '')} -k {json.dumps(args.keyword)}".strip()
        subprocess.run([str(SUITE / "run.sh"), "all" if args.control else "lorakit"], cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        print(f"(pytest's logs: {work}/log_*.txt; root-cause groups, with --control: {work}/triage.txt)\n")
    runs = {name: outcomes(work / f"results_{name}.jsonl") for name in ("peft", "lorakit")
            if (work / f"results_{name}.jsonl").is_file()}
    if "lorakit" not in runs:
        sys.exit(f"no {work / 'results_lorakit.jsonl'}: run without --no-run first")
    print(table({("real peft (control)" if k == "peft" else k): v for k, v in runs.items()}))
    if "peft" in runs:
        print("\n" + share(runs["peft"], runs["lorakit"]))
    else:
        print("\n(no control results in the work folder: run with --control for lorakit's share of PEFT's passes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
