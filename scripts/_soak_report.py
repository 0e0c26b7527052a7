"""scripts/soak.py's figures: the summary it writes as JSON (totals, latency percentiles, RSS
at warm-up and at the end, the time series thinned to at most ``MAX_POINTS``), the PNG of the
series over time, and a one-paragraph headline."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

# A 30-minute run samples 1,800 times; 600 points still show every burst cycle (20 s) and
# keep the JSON small enough to commit.
MAX_POINTS = 600
_GAUGES = ("slots_in_use", "queue_depth", "in_flight", "kv_pages_used", "kv_pages_cached")


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (50, 90, 99)}


def latency(latencies: dict[str, list[tuple[float, float | None]]]) -> dict[str, dict]:
    """Seconds from sending to the end, and to the first token, of the requests that ended
    ok, by front end and kind."""
    table = {}
    for key in sorted(latencies):
        pairs = latencies[key]
        entry = {"n": len(pairs), "seconds": percentiles([s for s, _ in pairs])}
        first = [f for _, f in pairs if f is not None]
        if first:
            entry["first_token_seconds"] = percentiles(first)
        table[key] = entry
    return table


def rss(idle_checks: list[dict], duration_s: float, warm_up_share: float) -> dict:
    """RSS at two idle points: the last within the warm-up (or the first idle point, if the
    warm-up ended before any) and the last of the run, and the highest at any idle point.
    Idle points compare like with like: no request holds memory at either."""
    points = [(c["t"], c["rss_mb"]) for c in idle_checks]
    warm_up_end = warm_up_share * duration_s
    within = [p for p in points if p[0] <= warm_up_end]
    warm, end = within[-1] if within else points[0], points[-1]
    return {
        "warm_up_end_s": round(warm_up_end, 1),
        "warm_up_at_s": warm[0],
        "warm_up_mb": warm[1],
        "end_at_s": end[0],
        "end_mb": end[1],
        "growth_pct": round(100 * (end[1] - warm[1]) / warm[1], 2),
        "peak_mb": max(p[1] for p in points),
    }


def thin(samples: list[dict]) -> dict[str, list]:
    """The samples as columns, at most MAX_POINTS: each point the maximum of its gauges and
    RSS over the samples it stands for, and the last of its running totals."""
    step = max(1, math.ceil(len(samples) / MAX_POINTS))
    columns: dict[str, list] = {"t": [], "rss_mb": [], **{g: [] for g in _GAUGES}}
    totals = [k for k in samples[0] if k not in columns and k != "phase"] if samples else []
    columns |= {k: [] for k in totals}
    for i in range(0, len(samples), step):
        group = samples[i : i + step]
        columns["t"].append(group[-1]["t"])
        for key in ("rss_mb", *_GAUGES):
            values = [s[key] for s in group if key in s]
            columns[key].append(max(values) if values else None)
        for key in totals:
            columns[key].append(group[-1][key])
    return columns


def write(result: dict, out: Path) -> None:
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "soak.png")


def plot(result: dict, path: Path) -> bool:
    """The series over time; False (and a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    t = np.asarray(series["t"], dtype=np.float64)
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    rate_ax, load_ax, pages_ax, rss_ax = axes

    dt = np.diff(t, prepend=0.0)
    dt[dt <= 0] = np.nan
    for outcome in ("ok", "cancelled", "invalid", "rejected", "killed", "internal", "unexpected"):
        totals = np.asarray(series[outcome], dtype=np.float64)
        if totals[-1] > 0:
            rate_ax.plot(t, np.diff(totals, prepend=0.0) / dt, label=outcome, lw=1)
    rate_ax.set_ylabel("requests ended / s")
    rate_ax.legend(loc="upper left", ncol=7, fontsize=8)

    for key, label in (
        ("in_flight", "in flight (admitted)"),
        ("slots_in_use", "slots in use"),
        ("queue_depth", "queue depth"),
    ):
        load_ax.plot(t, _floats(series[key]), label=label, lw=1)
    info = result["server"]
    load_ax.axhline(info["max_slots"], color="grey", ls=":", lw=1, label="slots")
    load_ax.axhline(info["capacity"], color="black", ls=":", lw=1, label="capacity")
    load_ax.set_ylabel("requests")
    load_ax.legend(loc="upper left", ncol=5, fontsize=8)

    pages_ax.plot(t, _floats(series["kv_pages_used"]), label="held by requests", lw=1)
    pages_ax.plot(t, _floats(series["kv_pages_cached"]), label="prefix-cached (evictable)", lw=1)
    pages_ax.axhline(info["kv_pages"], color="black", ls=":", lw=1, label="pool")
    idle = result["idle_checks"]
    pages_ax.scatter(
        [c["t"] for c in idle], [c.get("kv_pages_used", np.nan) for c in idle],
        s=10, color="green", zorder=3, label="after each burst (idle)",
    )  # fmt: skip
    pages_ax.set_ylabel("KV pages")
    pages_ax.legend(loc="upper left", ncol=4, fontsize=8)

    memory = result["rss"]
    rss_ax.plot(t, _floats(series["rss_mb"]), lw=1, label="server RSS (max per point)")
    rss_ax.scatter([c["t"] for c in idle], [c["rss_mb"] for c in idle], s=10, color="green",
                   zorder=3, label="at idle")  # fmt: skip
    rss_ax.axvline(memory["warm_up_end_s"], color="grey", ls="--", lw=1, label="end of warm-up")
    limit = memory["warm_up_mb"] * (1 + result["config"]["max_rss_growth"] / 100)
    rss_ax.axhline(limit, color="red", ls=":", lw=1, label="limit (warm-up idle RSS + max growth)")
    rss_ax.set_ylabel("MiB")
    rss_ax.set_xlabel("seconds into the soak")
    rss_ax.legend(loc="lower right", fontsize=8)

    for ax in axes:
        for burst in result["bursts"]:
            ax.axvspan(burst["t"], burst["t"] + burst["seconds"], color="orange", alpha=0.15, lw=0)
        ax.grid(alpha=0.3)
    verdict = "PASS" if result["passed"] else "FAIL"
    fig.suptitle(
        f"jaxllm chaos soak, {result['duration_s']:.0f} s ({verdict}): "
        f"{result['requests']['total']} requests, {result['internal']} INTERNAL, "
        f"RSS {memory['growth_pct']:+.1f}% after warm-up; bursts shaded"
    )
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=90)
    plt.close(fig)
    # 128 colours: a third of the bytes of full colour (the plot is committed under docs/),
    # and these flat lines lose nothing visible.
    from PIL import Image  # a dependency of matplotlib

    Image.open(image).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return True


def _floats(values: list) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def headline(result: dict) -> str:
    requests, memory = result["requests"], result["rss"]
    lines = [
        f"soak: {result['duration_s']:.0f} s, {requests['total']} requests: "
        + ", ".join(f"{k} {v}" for k, v in requests["by_outcome"].items()),
        f"soak: INTERNAL {result['internal']}; idle after {result['leak']['idle']} of "
        f"{result['leak']['checks']} bursts; RSS {memory['warm_up_mb']:.0f} MiB at "
        f"{memory['warm_up_at_s']:.0f} s -> {memory['end_mb']:.0f} MiB at "
        f"{memory['end_at_s']:.0f} s ({memory['growth_pct']:+.2f}%)",
    ]
    for name, verdict in result["properties"].items():
        lines.append(f"soak: {'PASS' if verdict['pass'] else 'FAIL'} {name}: {verdict['detail']}")
    return "\n".join(lines)
