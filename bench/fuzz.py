"""Decoder fuzz: mutated real files (tests/mutants.py) through `seg predict` and POST /segment.

Each mutant must be segmented or refused with a message: `seg predict` exits 0 or 1, prints no traceback
and reports every failed file in summary.json with a one-line error; the service answers 200 or a 4xx with
a JSON error (no 5xx, no hang, no Python reprs or server paths). Prints the tally by format and outcome.

    .venv/bin/python bench/fuzz.py --count 400
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from mutants import REPRS, mutants  # noqa: E402
from service import start_server, stop_server  # noqa: E402

from seg.inference.runtime import BUNDLED_MODEL  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="seg-fuzz-") as tmp:
        folder = Path(tmp) / "mutants"
        folder.mkdir()
        for name, data in mutants(args.count, args.seed):
            (folder / name).write_bytes(data)

        done = subprocess.run([sys.executable, "-m", "seg.cli", "predict", str(folder), "--out", f"{tmp}/out"],
                              capture_output=True, text=True, timeout=1800)  # fmt: skip
        if done.returncode not in (0, 1) or any(m in done.stderr for m in REPRS):
            problems.append(f"seg predict: exit {done.returncode}: {done.stderr[-500:]}")
        entries = json.loads(Path(tmp, "out", "summary.json").read_text())["images"]
        cli = collections.Counter()
        for e in entries:
            cli[(Path(e["input"]).suffix, e["status"])] += 1
            if e["status"] == "failed" and any(m in e["error"] for m in REPRS):
                problems.append(f"seg predict: {e['error']}")

        proc, url = start_server(BUNDLED_MODEL, "cpu", Path(tmp) / "server.log")
        http = collections.Counter()
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                for path in sorted(folder.iterdir()):
                    try:
                        response = client.post("/segment", content=path.read_bytes(),
                                               headers={"content-type": "application/octet-stream"})  # fmt: skip
                    except httpx.TimeoutException:
                        problems.append(f"POST {path.name}: no answer in 120 s")
                        continue
                    status = response.status_code
                    http[(path.suffix, "200" if status == 200 else f"{status // 100}xx")] += 1
                    if status >= 500 or (status != 200 and 400 <= status < 500 and not _clean(response, tmp)):
                        problems.append(f"POST {path.name}: {status} {response.text[:200]}")
                    elif status != 200 and not 400 <= status < 500:
                        problems.append(f"POST {path.name}: {status}")
        finally:
            stop_server(proc)

    print(f"\n{args.count} mutants (seed {args.seed}), `seg predict` exit {done.returncode}\n")
    print("| format | seg predict ok | seg predict failed | HTTP 200 | HTTP 4xx | HTTP 5xx |")
    print("| --- | --- | --- | --- | --- | --- |")
    for suffix in sorted({s for s, _ in cli}):
        print(f"| {suffix} | {cli[suffix, 'ok']} | {cli[suffix, 'failed']} | {http[suffix, '200']} "
              f"| {http[suffix, '4xx']} | {http[suffix, '5xx']} |")  # fmt: skip
    print(f"\nproblems: {len(problems)}")
    for problem in problems[:20]:
        print(f"  {problem}")


def _clean(response: httpx.Response, tmp: str) -> bool:
    """A JSON {"error": ...} without reprs, tracebacks or server paths."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(error) and not any(m in error for m in (*REPRS, tmp, str(ROOT)))


if __name__ == "__main__":
    main()
