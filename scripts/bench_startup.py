"""Cold and warm start-up, as a user gets them: fresh processes, the library's defaults.

Each measurement is a new Python process that runs ``LLM.load(path)`` (one CPU device, the
default engine options), generates 2 tokens and exits; the parent times it from spawn to exit
and reads the engine's start-up report (``jaxllm.startup``). Cases:

- cold / warm: a ~1.1 GB, 24-layer float32 Llama with an empty compilation cache, then again
  with the cache the first run filled (the issue's targets, under 30 s and under 10 s, are on
  ready to serve: the report's total; with background compile, the default, the child then
  waits until every step shape is compiled and records that too: ``all_compiled_s``), with
  the default layers (scanned, read in place by jaxllm's CPU kernels) and then unrolled
  (``scan_layers=False``), with the decode speed of each at 1 and 8 concurrent requests
  and the prefill speed of a 512-token prompt;
- depth: compile time of the same width at 8 and 32 layers, each on an empty cache (the
  issue's target: it grows by less than 20%);
- serve: the demo model's ``jaxllm serve`` until its gRPC health says SERVING, on a cold and
  then a warm cache (target: under 10 s warm).

    python scripts/bench_startup.py [--out out/startup] [--quick]

Writes ``bench_startup.json`` under ``--out``. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import MODELS, write_random_checkpoint  # noqa: E402

TARGETS = {"cold_s": 30.0, "warm_s": 10.0, "compile_growth_8_to_32": 0.20, "serve_warm_s": 10.0}
CHILD = """
import json, sys, time
import jaxllm
scan = {"default": None, "scan": True, "unroll": False}[sys.argv[3]]
greedy = dict(temperature=0, ignore_eos=True)
llm = jaxllm.LLM.load(sys.argv[1], compilation_cache=sys.argv[2], scan_layers=scan)
out = llm.generate([1, 2, 3], max_tokens=2, temperature=0)
report = llm.engine.stats()["startup"]
report["generated"] = out.token_ids
report["scan_layers"] = llm.runner.spec.scan_layers
start = time.perf_counter()
decoded = llm.generate([1, 2, 3], max_tokens=32, **greedy)
# While the background compile runs (the default), which shares the cores.
report["batch1_during_compile_tok_s"] = len(decoded.token_ids) / (time.perf_counter() - start)
# Background compile (the default): ready above; every step shape compiled from here.
llm.engine.wait_compiled()


def seconds(tokens):
    start = time.perf_counter()
    llm.generate([1, 2, 3], max_tokens=tokens, **greedy)
    return time.perf_counter() - start


# Batch-1 decode step: the slope from 16 to 80 tokens (prefill and start cancel out).
short, long = min(seconds(16) for _ in range(3)), min(seconds(80) for _ in range(3))
report["batch1_decode_step_ms"] = (long - short) / 64 * 1e3
for _ in range(2):  # the second round is timed: the first may meet cold caches
    start = time.perf_counter()
    outs = llm.generate([[1, 2, 3 + i] for i in range(8)], max_tokens=32, **greedy)
    tokens = sum(len(o.token_ids) for o in outs)
    report["batch8_decode_tok_s"] = tokens / (time.perf_counter() - start)
    prompt = [(7 * i) % 1000 + 3 for i in range(512)]
    start = time.perf_counter()
    llm.generate(prompt, max_tokens=1, **greedy)
    report["prefill_512_tok_s"] = 512 / (time.perf_counter() - start)
full = llm.engine.stats()["startup"]
report["all_compiled_s"] = full["total_s"] + full["background_compile_s"]
report["compile_all_s"] = full["compile_s"] + full["background_compile_s"]
report["programs_compiled_all"] = full["programs_compiled"]
report["programs_cached_all"] = full["programs_cached"]
print("STARTUP " + json.dumps(report), flush=True)
"""


def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user gets it
    return env


def start_once(model: Path, cache: Path, layers: str = "default") -> dict:
    """One fresh process: load, generate 2 tokens (then time 32 more), exit. Its report
    plus the wall time. ``layers``: default, scan or unroll (``LLM.load``'s scan_layers)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(cache), layers],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - start
    found = re.search(r"^STARTUP (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"child exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {"process_wall_s": wall, "exit_code": proc.returncode, **json.loads(found.group(1))}


def serve_ready_once(cache: Path, log_path: Path) -> dict:
    """``jaxllm serve`` of the demo model until gRPC health says SERVING; then SIGINT."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    env = {**child_env(), "XDG_CACHE_HOME": str(cache)}
    command = [sys.executable, "-m", "serve.cli", "serve", "--port", "0"]
    command += ["--compilation-cache", str(cache)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        port = None
        while port is None:
            found = re.search(r"jaxllm: listening on [\d.]+:(\d+)", log_path.read_text())
            port = int(found.group(1)) if found else None
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.02)
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = health_pb2.HealthCheckRequest(service="jaxllm.v1.LLM")
        while True:
            try:
                status = stub.Check(request, timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.perf_counter() - start > 300:
                raise TimeoutError(log_path.read_text()[-3000:])
            time.sleep(0.02)
        ready = time.perf_counter() - start
    finally:
        proc.send_signal(2)
        proc.wait(timeout=60)
    lines = [line for line in log_path.read_text().splitlines() if "start-up" in line]
    return {"ready_s": ready, "exit_code": proc.returncode, "startup_log": lines}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/startup"))
    p.add_argument("--quick", action="store_true", help="small models: a smoke run")
    p.add_argument("--no-depth", action="store_true", help="skip the 8- and 32-layer runs")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    big = MODELS["quick"] if args.quick else MODELS["llama24"]
    width = dataclasses.replace(big, label="depth")
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "python": sys.version.split()[0],
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        result["model"] = {"dims": dataclasses.asdict(big)} | write_random_checkpoint(
            model, big, "float32"
        )
        for layers in ("default", "unroll"):
            cold = start_once(model, tmp / f"cache-{layers}", layers)
            warm = start_once(model, tmp / f"cache-{layers}", layers)
            result[f"{layers}_cold"], result[f"{layers}_warm"] = cold, warm
            print(f"{layers}: cold {cold['process_wall_s']:.1f} s {cold}")
            print(f"{layers}: warm {warm['process_wall_s']:.1f} s {warm}")

        for layers in () if args.no_depth else ("default", "unroll"):
            depth = {}
            for count in (8, 32):
                folder = tmp / f"depth{count}"
                if not folder.exists():
                    dims = dataclasses.replace(width, layers=count)
                    write_random_checkpoint(folder, dims, "float32")
                depth[count] = start_once(folder, tmp / f"cache-{layers}-{count}", layers)
                print(f"{layers}, {count} layers, cold cache: {depth[count]}")
            growth = depth[32]["compile_all_s"] / depth[8]["compile_all_s"] - 1
            result[f"{layers}_depth"] = {"8": depth[8], "32": depth[32], "growth": growth}

        serve_cache = tmp / "serve-cache"
        serve = [serve_ready_once(serve_cache, tmp / f"serve{i}.log") for i in range(2)]
        result["serve_demo"] = {"cold": serve[0], "warm": serve[1]}
        cold_s, warm_s = serve[0]["ready_s"], serve[1]["ready_s"]
        print(f"demo serve ready: cold {cold_s:.1f} s, warm {warm_s:.1f} s")

    # The targets are on LLM.load + warm-up (the report's total), as the issue states them;
    # process_wall_s adds Python and JAX imports, the 2+32 generated tokens and exit.
    result["met"] = {
        f"{layers}_{name}": ok
        for layers in ("default", "unroll")
        for name, ok in {
            "cold_s": result[f"{layers}_cold"]["total_s"] < TARGETS["cold_s"],
            "warm_s": result[f"{layers}_warm"]["total_s"] < TARGETS["warm_s"],
            "warm_compiles_nothing": result[f"{layers}_warm"]["programs_compiled_all"] == 0,
            "compile_growth_8_to_32": f"{layers}_depth" in result
            and result[f"{layers}_depth"]["growth"] < TARGETS["compile_growth_8_to_32"],
        }.items()
    }
    result["met"]["serve_warm_s"] = serve[1]["ready_s"] < TARGETS["serve_warm_s"]
    (args.out / "bench_startup.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["met"], indent=2))


if __name__ == "__main__":
    main()
