"""scripts/device_check.sh runs end to end on CPU in its dry-run mode, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "device_check.sh"


def test_device_check_dry_run(tmp_path):
    assert os.access(SCRIPT, os.X_OK)
    # The script's own processes: no fake devices, the plain CPU backend.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHON"] = sys.executable
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "device_check.json").read_text())
    assert summary["dry_run"] is True
    assert summary["devices_rc"] == summary["tests_rc"] == summary["bench_rc"] == 0
    assert "cpu" in summary["devices"].lower()
    bench = summary["bench"]
    assert bench["backend"] == "cpu" and bench["dtype"] == "float32"
    assert bench["params"] > 0
    assert bench["read_bandwidth_gbps"] > 0.1
    assert bench["batch1_step_ms"] > 0 and 0 < bench["batch1_mbu"] < 1.5
    assert set(bench["tokens_per_s"]) == {"1", "4"}
    assert all(v > 0 for v in bench["tokens_per_s"].values())
    assert bench["xla_compiles_in_timed_regions"] == 0
    full = json.loads((tmp_path / "bench_engine.json").read_text())
    assert {"machine", "model", "decode", "sweep", "load"} <= set(full)
    assert (tmp_path / "tests.xml").exists()
