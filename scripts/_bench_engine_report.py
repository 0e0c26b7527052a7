"""bench_engine's ratios and targets, its table on stdout and its plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from _bench_common import GIB, Round, hf_sequential_at, percentiles


def decode_result(rounds: list[Round], model: dict, args) -> dict:
    """The fastest round's mean decode step and the bytes per second it reads: every weight
    but the embedding table, and the K/V of the positions held (mean over the request)."""
    best = min(rounds, key=lambda r: r.tpot_s[0])
    step_s = best.tpot_s[0]
    kv = model["kv_bytes_per_token"] * (args.prompt_len + args.decode_tokens / 2)
    read = model["decode_weight_bytes"] + kv
    return {
        "step_ms": step_s * 1e3,
        "step_ms_all_rounds": [r.tpot_s[0] * 1e3 for r in rounds],
        "bytes_read_per_step": {"weights": model["decode_weight_bytes"], "kv_cache": kv},
        "achieved_gbps": read / step_s / 1e9,
        "noise_per_round": [dataclasses.asdict(r.noise) for r in rounds],
        "stats_delta_best": best.stats_delta,
    }


def summarise_rounds(rounds: list[Round]) -> dict:
    best = max(rounds, key=lambda r: r.tokens_per_s)
    return {
        "tokens_per_s": best.tokens_per_s,
        "tokens_per_s_all_rounds": [r.tokens_per_s for r in rounds],
        "wall_s": best.wall_s,
        "ttft_s": percentiles(best.ttft_s),
        "tpot_s": percentiles(best.tpot_s),
        "stats_delta": best.stats_delta,
        "noise_per_round": [dataclasses.asdict(r.noise) for r in rounds],
    }


def _target(value, op: str, bound) -> dict:
    met = value is not None and (
        value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
    )
    return {"value": value, "target": f"{op} {bound}", "met": bool(met)}


def summarise(results: dict, args, targets_spec: dict) -> None:
    """Adds MBU, ratios and the issue's targets (met or missed) to ``results``."""
    limits = results["machine"]["limits"]
    # Other processes can only lower a measurement: the best of start and end is the limit.
    read = max(limits[k]["best_read_gbps"] for k in ("read_bandwidth", "read_bandwidth_end"))
    results["read_bandwidth_gbps"] = read
    targets: dict[str, dict] = {}
    for name, m in results["models"].items():
        for d in m["decode"].values():
            d["mbu"] = d["achieved_gbps"] / read
        seq, ratios = m["hf_sequential"], {}
        for c, row in m["sweep"].items():
            engine = row["engine"]["tokens_per_s"]
            row["hf_sequential"] = hf_sequential_at(seq["request_s"], int(c), seq["output_len"])
            ratios[c] = {
                "over_hf_batched": engine / row["hf_batched"]["tokens_per_s"],
                "over_hf_sequential": engine / row["hf_sequential"]["tokens_per_s"],
            }
        m["ratios"] = ratios
        for c, row in m.get("tuned", {}).get("sweep", {}).items():
            # transformers ran beside the defaults' rounds, not again beside these.
            row["over_hf_batched"] = (
                row["engine"]["tokens_per_s"] / m["sweep"][c]["hf_batched"]["tokens_per_s"]
            )
        if name == args.mbu_model:
            d = m["decode"]["defaults"]
            targets[f"{name}: batch-1 decode MBU, defaults"] = _target(
                d["mbu"], ">=", targets_spec["mbu_batch1"]
            )
            if "max_num_seqs=1" in m["decode"]:
                ratio = d["step_ms"] / m["decode"]["max_num_seqs=1"]["step_ms"]
                m["step_ratio_defaults_over_max_num_seqs_1"] = ratio
                targets[f"{name}: batch-1 step, max_num_seqs=64 / =1"] = _target(
                    ratio, "<=", targets_spec["step_ratio_max_num_seqs_64_over_1"]
                )
        for c in ("32", "64"):
            if c in ratios:
                targets[f"{name}: tokens/s over transformers batched at {c}"] = _target(
                    ratios[c]["over_hf_batched"], ">=", targets_spec["over_hf_batched_at_32_and_64"]
                )
        worst = min(min(r.values()) for r in ratios.values())
        targets[f"{name}: ahead of transformers (batched, one at a time) at every level"] = _target(
            worst, ">=", 1.0
        )
        if "kv_capacity" in m:
            kv = m["kv_capacity"]
            goal = targets_spec["concurrent_200_token_requests_in_8x1024_pool"]
            what = (
                f"{kv['request_tokens']}-token requests in flight, {kv['pool_tokens']}-token pool"
            )
            targets[f"{name}: full-length {what}"] = _target(
                kv["full_requests_in_flight"], ">=", goal
            )
            targets[f"{name}: running at once, {what}"] = _target(kv["peak"]["running"], ">=", goal)
    lat = results["latency"]
    targets["prefix cache: TTFT second / first"] = _target(
        lat["prefix_cache"]["ratio"], "<=", targets_spec["prefix_ttft_ratio"]
    )
    # The median of steady decode, before the prompt arrives: the window's own median would
    # rise with the share of gaps that the prompt's chunks slow down.
    targets["interference: inter-token gap p99 / steady p50"] = _target(
        lat["interference"]["p99_over_before_p50"],
        "<=",
        targets_spec["interference_p99_over_steady_p50"],
    )
    rss = lat["peak_rss_bytes"]
    targets["interference: peak RSS GiB (max_seq_len=4096)"] = _target(
        rss / GIB if rss else None, "<", targets_spec["peak_rss_gib"]
    )
    compiles = results["compiles_in_timed_regions"]
    bad = [k for k, v in compiles.items() if v["xla_compiles"] or v["engine_compiles"]]
    targets["compiles inside timed regions"] = {
        "value": sum(v["xla_compiles"] for v in compiles.values()),
        "target": "== 0 in every region",
        "met": not bad,
        "regions_with_compiles": bad,
    }
    results["targets"] = targets


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f}"


def _busy(noises) -> str:
    return "/".join(str(n["other_cpu_cores"]) for n in noises)


def print_report(results: dict, args) -> None:
    lim = results["machine"]["limits"]
    print("\n=== machine limits (this run) ===")
    for when in ("read_bandwidth", "read_bandwidth_end"):
        bw = lim[when]
        reads = ", ".join(
            f"{k} {bw[f'{k}_read_gbps']:.1f}"
            for k in ("jax_sum", "jax_matvec", "torch_sum", "numpy_sum")
        )
        print(
            f"{'start' if when == 'read_bandwidth' else 'end':>5}: read GB/s {reads}; numpy copy "
            f"(r+w) {bw['numpy_copy_gbps_read_plus_write']:.1f}; other cores busy "
            f"{bw['noise']['other_cpu_cores']}"
        )
    mm = lim["matmul"]
    print(
        f"f32 matmul {mm['size']}^3: jax {mm['jax_gflops']:.0f}, torch {mm['torch_gflops']:.0f}"
        f" GFLOP/s. MBU is against {results['read_bandwidth_gbps']:.1f} GB/s. JAX devices in "
        f"this process: {results['machine']['jax_devices']}"
    )
    if args.quick:
        print("(--quick: one small model and few levels; not the issue's figures)")

    print("\n=== what a user gets: jaxllm.LLM.load(path), library defaults, one CPU device ===")
    for name, m in results["models"].items():
        mod, load = m["model"], m["defaults_load"]
        cfg = load.get("engine_config", {})
        shown = {
            k: cfg[k]
            for k in (
                "max_seq_len",
                "max_num_seqs",
                "max_step_tokens",
                "page_size",
                "kv_cache_bytes",
                "prefix_caching",
            )
            if k in cfg
        }
        stats = load.get("stats_at_start", {})
        print(
            f"\n[{name}] {m['label']}: {mod['params'] / 1e6:.0f}M params, "
            f"{mod['weight_bytes'] / 1e9:.2f} GB f32, L={mod['layers']} D={mod['hidden']} "
            f"F={mod['intermediate']} N/K={mod['heads']}/{mod['kv_heads']}"
        )
        print(
            f"  engine: {shown or 'config not exposed'}; pool {stats.get('pages_total', '?')} "
            f"pages x {stats.get('page_size', '?')} tokens, "
            f"{stats.get('kv_cache_bytes', 0) / GIB:.2f} GiB; devices {load.get('devices', '?')};"
            f" load + warm-up {load['load_and_warm_up_s']:.1f} s, "
            f"{load['xla_compiles_at_load']} XLA compiles"
        )
        d = m["decode"]["defaults"]
        read = d["bytes_read_per_step"]
        print(
            f"  batch-1 decode: step {d['step_ms']:.2f} ms (rounds "
            f"{', '.join(f'{x:.1f}' for x in d['step_ms_all_rounds'])}), reads "
            f"{(read['weights'] + read['kv_cache']) / 1e6:.0f} MB -> {d['achieved_gbps']:.1f} "
            f"GB/s, MBU {d['mbu']:.2f}; busy {_busy(d['noise_per_round'])}"
        )
        agree = m["greedy_agreement"]
        print(
            f"  greedy agreement with transformers: first {agree['matching_prefix']} of "
            f"{agree['tokens']} tokens identical"
        )
        print(
            f"  {args.prompt_len}-token prompts, {args.output_len} output tokens each, all "
            "submitted at once:"
        )
        print(
            f"  {'conc':>5} {'jaxllm':>8} {'HF batch':>9} {'HF 1-by-1':>9} {'x batch':>8} "
            f"{'x 1-by-1':>8} {'TTFT p50/p99 ms':>16} {'TPOT p50/p99 ms':>16} {'preempt':>7} "
            f"{'busy eng | HF':>14}"
        )
        for c, row in m["sweep"].items():
            e, r, hb = row["engine"], m["ratios"][c], row["hf_batched"]
            print(
                f"  {c:>5} {e['tokens_per_s']:>8.1f} {hb['tokens_per_s']:>9.1f} "
                f"{row['hf_sequential']['tokens_per_s']:>9.1f} {r['over_hf_batched']:>8.2f} "
                f"{r['over_hf_sequential']:>8.2f} "
                f"{_ms(e['ttft_s']['p50']) + '/' + _ms(e['ttft_s']['p99']):>16} "
                f"{_ms(e['tpot_s']['p50']) + '/' + _ms(e['tpot_s']['p99']):>16} "
                f"{e['stats_delta'].get('preemptions', '?'):>7} "
                f"{_busy(e['noise_per_round']) + ' | ' + str(hb['noise']['other_cpu_cores']):>14}"
            )
        print(f"  (1-by-1: the fastest of {len(m['hf_sequential']['request_s'])} timed requests)")

    lat = results["latency"]
    inter, prefix = lat["interference"], lat["prefix_cache"]
    print(f"\n[{args.latency_model}] LLM.load(path, max_seq_len=4096), otherwise defaults:")
    g, ph = inter["gap_s"], inter["per_phase_gap_s"]
    print(
        f"  {inter['streams']} streams decoding, a {inter['long_prompt_tokens']}-token prompt "
        f"arrives (TTFT {inter['long_prompt_ttft_s']:.2f} s): gaps p50 {_ms(g['p50'])} ms, p99 "
        f"{_ms(g['p99'])} ms, max {_ms(g['max'])} ms; p99 / steady p50 (before the prompt) "
        f"{inter['p99_over_before_p50']:.2f}, p99 / window p50 {inter['p99_over_p50']:.2f}"
    )
    phases = "; ".join(
        f"{k} p50 {_ms(v['p50'])} max {_ms(v['max'])} ms ({v['n']} gaps)" for k, v in ph.items()
    )
    print(f"  gaps before / during the prompt's prefill / after it: {phases}")
    rss = lat["peak_rss_bytes"]
    print(
        f"  peak RSS of that process: {rss / GIB:.2f} GiB (peak after load "
        f"{lat['peak_rss_after_load_bytes'] / GIB:.2f} GiB); busy "
        f"{inter['noise']['other_cpu_cores']}"
    )
    t = prefix["median_trial"]
    ratios = ", ".join(f"{r['ratio']:.3f}" for r in prefix["trials"])
    print(
        f"  prefix cache, {prefix['prefix_len']}-token shared prefix: TTFT first "
        f"{_ms(t['first']['ttft_s'])} ms, second {_ms(t['second']['ttft_s'])} ms "
        f"({t['second']['prefix_hit_tokens']} tokens hit) -> {prefix['ratio']:.3f} (median of "
        f"{ratios})"
    )

    print("\n=== tuned settings (not the defaults) ===")
    for name, m in results["models"].items():
        if "max_num_seqs=1" in m["decode"]:
            d = m["decode"]["max_num_seqs=1"]
            print(
                f"[{name}] max_num_seqs=1: batch-1 step {d['step_ms']:.2f} ms, MBU {d['mbu']:.2f};"
                f" defaults / this: {m['step_ratio_defaults_over_max_num_seqs_1']:.3f}"
            )
        for c, row in m.get("tuned", {}).get("sweep", {}).items():
            e = row["engine"]
            print(
                f"[{name}] {' '.join(args.tuned)} at {c}: {e['tokens_per_s']:.1f} tokens/s "
                f"({row['over_hf_batched']:.2f}x "
                f"transformers batched of the defaults' rounds), TTFT p50 {_ms(e['ttft_s']['p50'])}"
                f" ms, TPOT p50 {_ms(e['tpot_s']['p50'])} ms"
            )
        kv = m.get("kv_capacity")
        if kv:
            print(
                f"[{name}] kv_cache_bytes={kv['kv_cache_bytes_asked']} ({kv['pool_tokens']} "
                f"tokens): {kv['requests']} requests of {kv['request_tokens']} tokens at once -> "
                f"at most {kv['peak']['running']} running, {kv['tokens_in_flight']} tokens in "
                f"flight ({kv['full_requests_in_flight']} full requests) = "
                f"{kv['tokens_in_flight_per_gib']:.0f} tokens/GiB; one slot of max_seq_len per "
                f"request would fit {kv['slot_engine_equivalent']}; {kv['preemptions']} "
                f"preemptions, {kv['tokens_per_s']:.0f} tokens/s"
            )

    compiles = results["compiles_in_timed_regions"]
    total = sum(v["xla_compiles"] for v in compiles.values())
    print(f"\n=== compiles inside {len(compiles)} timed regions: {total} ===")
    for k, v in compiles.items():
        if v["xla_compiles"] or v["engine_compiles"]:
            print(f"  NON-ZERO {k}: {v}")
    print("\n=== targets ===")
    for name, t in results["targets"].items():
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"  {'MET   ' if t['met'] else 'MISSED'} {name}: {shown} (target {t['target']})")


def plot(results: dict, args, path: Path) -> bool:
    """tokens/s against concurrency per model; False (and a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models.values(), strict=True):
        cs = [int(c) for c in m["sweep"]]
        rows = [m["sweep"][str(c)] for c in cs]
        series = {
            "jaxllm, defaults": [r["engine"]["tokens_per_s"] for r in rows],
            "transformers, batched generate": [r["hf_batched"]["tokens_per_s"] for r in rows],
            "transformers, one at a time": [r["hf_sequential"]["tokens_per_s"] for r in rows],
        }
        for label, values in series.items():
            ax.plot(cs, values, marker="o", label=label)
        tuned = m.get("tuned", {}).get("sweep", {})
        if tuned:
            ax.plot(
                [int(c) for c in tuned],
                [r["engine"]["tokens_per_s"] for r in tuned.values()],
                marker="*",
                linestyle="none",
                markersize=12,
                label="jaxllm, " + " ".join(args.tuned),
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{m['label']} Llama, float32, CPU, 1 device")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.prompt_len}-token prompts, {args.output_len} output tokens each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
