"""Benchmark: Hugging Face -> Orbax conversion and Orbax restores into device meshes, on CPU.

What one run measures, in order (every heavy step in its own process, so that its peak host
memory is its own):

1. This machine's limits, in the same run: memory copy bandwidth, the rate at which fresh
   memory can be faulted in (every restored array is new memory), and the raw sequential
   read speed of the checkpoint files, cold (each file's pages dropped from the page cache
   with ``posix_fadvise(DONTNEED)`` first; ``mincore`` says whether the drop worked) and warm.
2. A random Llama model (float32, ~1.5 GB) written by ``transformers`` with
   ``save_pretrained``.
3. ``convert_hf_to_orbax``: time, throughput, peak host RSS over the process baseline, and
   the largest tensor for comparison.
4. ``load_orbax_state`` restores, cold and warm cache: one device, and 8 CPU devices
   (``--xla_force_host_platform_device_count=8``) on the mesh a ``save_state`` checkpoint was
   written from (``tensor=8``) and on other meshes (``data=2,tensor=4``, ``fsdp=4,tensor=2``):
   time, effective GB/s (model bytes / seconds), peak host RSS beyond the restored arrays
   (the arrays counted as the host memory their blocks take: a replicated block once per
   device) and as a share of the model's bytes.
5. For comparison, Orbax's plain restore of the whole tree at once (the same arrays saved as
   one ``StandardCheckpointer`` checkpoint), on one device.
6. A table on stdout and every number in ``out/bench_checkpoint.json``.

Run from the repository root (about 5-8 minutes):

    python scripts/bench_checkpoint.py [--layers 6] [--workdir /tmp/jaxllm_bench_checkpoint]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MESHES = ["tensor=8", "data=2,tensor=4", "fsdp=4,tensor=2"]


# -- page cache and memory ------------------------------------------------------------------


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore on a private mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        view = ctypes.c_char.from_buffer(mm)
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec):
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del view
    return sum(v & 1 for v in vec) / pages


def drop_from_page_cache(files: list[Path]) -> float:
    """Asks the kernel to drop the files' cached pages; returns the share still resident."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    total = sum(f.stat().st_size for f in files)
    return sum(resident_fraction(f) * f.stat().st_size for f in files) / total


def read_speed(files: list[Path]) -> float:
    """GB/s reading the files start to end into one reused 16 MiB buffer."""
    buffer = bytearray(16 << 20)
    total, start = 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / (time.perf_counter() - start) / 1e9


def memory_limits() -> dict:
    import numpy as np

    size = 256 << 20
    src = np.ones(size // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    copy = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        copy.append(2 * size / (time.perf_counter() - start) / 1e9)  # read + write
    fault = []
    for _ in range(3):
        start = time.perf_counter()
        fresh = np.ones(size // 4, np.float32)  # new pages: faulted in as they are written
        fault.append(size / (time.perf_counter() - start) / 1e9)
        del fresh
    return {"copy_gbps": round(max(copy), 2), "fresh_memory_gbps": round(max(fault), 2)}


def data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# -- child processes --------------------------------------------------------------------------


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak RSS since ``reset_peak`` (ru_maxrss would include the parent's RSS at fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child_convert(hf_dir: str, out_dir: str, tiny: str) -> dict:
    import jax.numpy as jnp
    import psutil

    from jaxllm.hf_checkpoint import HFCheckpoint
    from jaxllm.orbax_checkpoint import convert_hf_to_orbax, load_orbax_state, read_config
    from jaxllm.params import ModelSpec
    from sharding import DEFAULT_RULES, make_mesh

    # One-time set-up (Orbax's thread pools, JAX tracing) goes into the baseline.
    load_orbax_state(tiny, ModelSpec(read_config(tiny), jnp.float32, make_mesh(), DEFAULT_RULES))
    sizes = [f.nbytes(n) for f in HFCheckpoint(hf_dir).files.values() for n in f.entries]
    baseline = psutil.Process().memory_info().rss
    reset_peak()
    start = time.perf_counter()
    convert_hf_to_orbax(hf_dir, out_dir)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "bytes": sum(sizes),
        "gbps": sum(sizes) / seconds / 1e9,
        "peak_over_baseline": peak_rss() - baseline,
        "largest_tensor": max(sizes),
        "tensors": len(sizes),
    }


def child_restore(path: str, mesh: str, tiny: str, cold: bool, save_to: str, plain: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import psutil

    from jaxllm.orbax_checkpoint import load_orbax_state, read_config, save_state, tokenizer_dir
    from jaxllm.params import ModelSpec
    from sharding import DEFAULT_RULES, make_mesh

    def spec_of(folder):
        return ModelSpec(read_config(folder), jnp.float32, make_mesh(mesh), DEFAULT_RULES)

    load_orbax_state(tiny, spec_of(tiny))
    spec = spec_of(path)
    _, abstract = spec.abstract()
    target = spec.shardings(abstract)
    source = Path(path) / "plain" if plain else Path(path) / "arrays"
    resident = drop_from_page_cache(data_files(source)) if cold else None
    baseline = psutil.Process().memory_info().rss
    reset_peak()
    start = time.perf_counter()
    if plain:
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()
        abstract_arrays = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract.to_pure_dict(),
            target.to_pure_dict(),
        )
        state = checkpointer.restore(source, abstract_arrays)
    else:
        _, state = load_orbax_state(path, spec)
    jax.block_until_ready(jax.tree.leaves(state))
    seconds = time.perf_counter() - start
    peak, after = peak_rss(), psutil.Process().memory_info().rss
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    # What the arrays take in host memory: replicated blocks count once per device.
    held = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards)
    result = {
        "seconds": seconds,
        "bytes": nbytes,
        "array_bytes_held": held,
        "gbps": nbytes / seconds / 1e9,
        "peak_over_arrays": peak - baseline - held,
        "after_over_arrays": after - baseline - held,
        "resident_after_drop": resident,
        "devices": len(jax.devices()),
    }
    if save_to:
        start = time.perf_counter()
        save_state(state, spec.config, save_to, tokenizer_dir=tokenizer_dir(path))
        result["save_seconds"] = time.perf_counter() - start
    return result


def child_save_plain(path: str, tiny: str) -> dict:
    """The same arrays as one whole-tree Orbax checkpoint (Orbax's defaults), in ``path``."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxllm.orbax_checkpoint import load_orbax_state, read_config
    from jaxllm.params import ModelSpec
    from sharding import DEFAULT_RULES, make_mesh

    spec = ModelSpec(read_config(path), jnp.float32, make_mesh(), DEFAULT_RULES)
    _, state = load_orbax_state(path, spec)
    start = time.perf_counter()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path) / "plain", state.to_pure_dict())
    checkpointer.close()
    return {"seconds": time.perf_counter() - start}


def run_child(devices: int, *args: str) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    load = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average_before"] = load
    return result


# -- the run ----------------------------------------------------------------------------------

WRITE_MODEL = """
import sys, torch, transformers
config = transformers.LlamaConfig(
    hidden_size=2048, intermediate_size=5632, vocab_size=16000, num_hidden_layers=int(sys.argv[2]),
    num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
)
torch.manual_seed(0)
with torch.no_grad():
    transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1])
"""


def write_tiny(path: Path) -> None:
    """A tiny checkpoint that each child restores once before measuring (warm-up)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = str(REPO)
    code = (
        "import sys, jax.numpy as jnp; from jaxllm.config import ModelConfig; "
        "from jaxllm.params import ModelSpec; from jaxllm.orbax_checkpoint import save_state; "
        "from sharding import DEFAULT_RULES, make_mesh; "
        "c = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, "
        "num_heads=8, num_kv_heads=8, head_dim=8); "
        "s = ModelSpec(c, jnp.float32, make_mesh(), DEFAULT_RULES).random_state()[1]; "
        "save_state(s, c, sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jaxllm_bench_checkpoint"))
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_checkpoint.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "convert":
            result = child_convert(*rest)
        elif kind == "restore":
            path, mesh, tiny, cold, save_to, plain = rest
            result = child_restore(path, mesh, tiny, cold == "cold", save_to, plain == "plain")
        else:
            result = child_save_plain(*rest)
        print(json.dumps(result))
        return

    started = time.perf_counter()
    work = args.workdir
    hf_dir, ckpt, saved, tiny = work / "hf", work / "orbax", work / "saved_tensor8", work / "tiny"
    for folder in (ckpt, saved, tiny):
        shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if not (hf_dir / "config.json").is_file():
        print(f"writing the model to {hf_dir} ...", flush=True)
        subprocess.run(
            [sys.executable, "-c", WRITE_MODEL, str(hf_dir), str(args.layers)], check=True
        )
    write_tiny(tiny)
    report: dict = {"machine": {"cores": os.cpu_count(), **memory_limits()}}

    hf_files = sorted(hf_dir.glob("*.safetensors"))
    report["hf_read"] = {
        "resident_after_drop": drop_from_page_cache(hf_files),
        "cold_gbps": read_speed(hf_files),
        "warm_gbps": read_speed(hf_files),
    }
    print("converting ...", flush=True)
    report["convert"] = run_child(1, "convert", str(hf_dir), str(ckpt), str(tiny))
    ckpt_files = data_files(ckpt / "arrays")
    report["orbax_read"] = {
        "files": len(ckpt_files),
        "resident_after_drop": drop_from_page_cache(ckpt_files),
        "cold_gbps": read_speed(ckpt_files),
        "warm_gbps": read_speed(ckpt_files),
    }

    restores = {}

    def restore(label, devices, path, mesh, cold, save_to="", plain=False):
        print(f"restore: {label} ...", flush=True)
        restores[label] = run_child(
            devices,
            "restore",
            str(path),
            mesh,
            str(tiny),
            "cold" if cold else "warm",
            str(save_to),
            "plain" if plain else "ours",
        )
        restores[label].update(mesh=mesh, cold=cold)

    restore("converted -> 1 device, cold", 1, ckpt, "tensor=1", True)
    restore("converted -> 1 device, warm", 1, ckpt, "tensor=1", False)
    restore("converted -> tensor=8, warm (+ save_state)", 8, ckpt, "tensor=8", False, saved)
    for mesh in MESHES:
        same = "same mesh" if mesh == "tensor=8" else "other mesh"
        restore(f"saved on tensor=8 -> {mesh} ({same}), cold", 8, saved, mesh, True)
        restore(f"saved on tensor=8 -> {mesh} ({same}), warm", 8, saved, mesh, False)
    print("plain whole-tree Orbax checkpoint ...", flush=True)
    report["plain_save"] = run_child(1, "save_plain", str(ckpt), str(tiny))
    restore("plain Orbax whole tree -> 1 device, warm", 1, ckpt, "tensor=1", False, plain=True)
    report["restores"] = restores
    report["seconds"] = time.perf_counter() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")


def print_table(report: dict) -> None:
    mib = 2**20
    m, conv = report["machine"], report["convert"]
    print(f"\nmachine: {m['cores']} cores, copy {m['copy_gbps']} GB/s (read+write), fresh memory")
    print(f"  faulted in at {m['fresh_memory_gbps']} GB/s")
    for name in ("hf_read", "orbax_read"):
        r = report[name]
        print(
            f"raw read of the {name.split('_')[0]} files: cold {r['cold_gbps']:.2f} GB/s "
            f"(after DONTNEED {r['resident_after_drop']:.0%} still cached), "
            f"warm {r['warm_gbps']:.2f} GB/s"
        )
    print(
        f"convert: {conv['bytes'] / 1e9:.2f} GB in {conv['tensors']} tensors, "
        f"{conv['seconds']:.1f} s ({conv['gbps']:.2f} GB/s), peak RSS +"
        f"{conv['peak_over_baseline'] / mib:.0f} MiB over baseline "
        f"(largest tensor {conv['largest_tensor'] / mib:.0f} MiB)"
    )
    print(f"\n{'restore':58} {'s':>6} {'GB/s':>6} {'RSS beyond arrays':>18}")
    for label, r in report["restores"].items():
        share = r["peak_over_arrays"] / r["bytes"]  # of the model's bytes
        rss = f"{r['peak_over_arrays'] / mib:.0f} MiB ({share:.0%})"
        print(f"{label:58} {r['seconds']:6.1f} {r['gbps']:6.2f} {rss:>18}")
        if "save_seconds" in r:
            print(f"{'  save_state from that tensor=8 state':58} {r['save_seconds']:6.1f}")


if __name__ == "__main__":
    main()
