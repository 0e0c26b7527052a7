"""The long fuzzing profile: the fuzz tests with many examples per entry point, and a JSON
summary of what each entry point answered.

    python scripts/fuzz.py --examples 20000 --out fuzz_summary.json

Runs tests/test_fuzz_serve.py (one real server, gRPC and HTTP) and tests/test_fuzz_inputs.py
(config files, flags, the notebook API) with ``JAXLLM_FUZZ_EXAMPLES`` set; exits with pytest's
code. The summary holds the outcomes per network entry point, the wall time and pytest's result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000, help="per entry point")
    parser.add_argument("--out", default="fuzz_summary.json")
    parser.add_argument("-k", help="pytest -k expression: only some entry points")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        outcomes = Path(folder) / "outcomes.json"
        env = {
            **os.environ,
            "JAXLLM_FUZZ_EXAMPLES": str(args.examples),
            "JAXLLM_FUZZ_SUMMARY": str(outcomes),
        }
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"]
        command += ["tests/test_fuzz_serve.py", "tests/test_fuzz_inputs.py"]
        if args.k:
            command += ["-k", args.k]
        started = time.monotonic()
        code = subprocess.call(command, cwd=REPO, env=env)
        summary = {
            "examples_per_entry_point": args.examples,
            "seconds": round(time.monotonic() - started, 1),
            "pytest_exit_code": code,
            "passed": code == 0,
            "outcomes": json.loads(outcomes.read_text()) if outcomes.exists() else None,
        }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
