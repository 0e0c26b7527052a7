"""Speculative decoding: tokens/s with and without it, in one run, against transformers'
prompt lookup on the same weights, and the memory-bandwidth limit.

The demo model (default; or ``--model PATH``) in one process with one CPU device, the
library's defaults plus ``speculative``:

- workloads: ``repetitive`` (greedy; a piece of standard-library source followed by its first
  lines again, so that the model's continuation repeats its prompt: editing, quoting) where
  drafting should help, and ``novel`` (temperature 1.0, seeded; short prompts) where drafts
  should mostly fail;
- at batch 1 (one request at a time) and batch 4 (submitted together);
- jaxllm without speculation, with n-gram drafting (``speculative="ngram"``, k = 4), and
  transformers ``generate`` on the same weights without and with ``prompt_lookup_num_tokens``
  (batch 1, repetitive; its prompt lookup takes one sequence);
- the limit: a batch-1 step reads every weight once: bytes / the best measured bandwidth.

Writes ``bench_spec.json``: tokens/s, speed-ups against no speculation, acceptance rate and
tokens per verifying row, whether greedy output was identical.

    python scripts/bench_spec.py --out out/          # about 4 minutes here
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# One CPU device: fake host devices would share the same cores (DESIGN.md).
os.environ.pop("XLA_FLAGS", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
from _bench_common import load_hf, measure_read_bandwidth, noise_meter, release  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.hf_checkpoint import save_hf_checkpoint  # noqa: E402


def repetitive_prompts(llm: jaxllm.LLM, count: int, budget: int) -> list[list[int]]:
    """Standard-library functions (at most ``budget`` tokens) followed by a blank line and
    their first two lines again: continuing means copying."""
    import fnmatch
    import heapq
    import json as json_module
    import shutil
    import string
    import textwrap

    sources = [textwrap.dedent, textwrap.indent, json_module.dumps, inspect.getdoc]
    sources += [string.capwords, fnmatch.translate, heapq.nsmallest, shutil.copyfileobj]
    sources += [os.path.join, os.path.splitext]
    prompts = []
    for fn in sources:
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):  # built in, or no source file here
            continue
        ids = llm.tokenizer.encode(source)[:budget]
        text = llm.tokenizer.decode(ids)
        head = "\n".join(text.splitlines()[:2]) + "\n"
        prompts.append(llm.tokenizer.encode(text + "\n\n" + head))
    return prompts[:count]


NOVEL = ["def parse_header(line):", "class Cache:", "import os\n\ndef main():", "for item in "]


def run(llm, prompts, batch: int, new_tokens: int, temperature: float) -> dict:
    """Best of two rounds: every prompt once, ``batch`` at a time."""
    best = None
    for _ in range(2):
        before = llm.engine.stats()
        outputs, start = [], time.perf_counter()
        with noise_meter() as noise:
            for i in range(0, len(prompts), batch):
                params = [
                    jaxllm.SamplingParams(
                        max_tokens=new_tokens, temperature=temperature, seed=i + j, ignore_eos=True
                    )
                    for j in range(len(prompts[i : i + batch]))
                ]
                reqs = [
                    llm.engine.submit(p, s)
                    for p, s in zip(prompts[i : i + batch], params, strict=True)
                ]
                outputs += [list(r.wait(600).token_ids) for r in reqs]
        wall = time.perf_counter() - start
        after = llm.engine.stats()
        tokens = sum(len(o) for o in outputs)
        result = {
            "tokens_per_s": tokens / wall,
            "wall_s": wall,
            "tokens": tokens,
            "steps": after["steps"] - before["steps"],
            "noise": dataclasses.asdict(noise),
            "outputs": outputs,
        }
        if "spec_draft_tokens" in after:
            drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
            kept = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
            result |= {"drafted": drafted, "accepted": kept, "acceptance": kept / max(1, drafted)}
        if best is None or result["tokens_per_s"] > best["tokens_per_s"]:
            best = result
    return best


def hf_rates(llm, prompts, new_tokens: int) -> dict:
    """transformers' greedy generate at batch 1, plain and with prompt lookup (k = 4)."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        save_hf_checkpoint(llm.runner.state, llm.config, folder)
        model = load_hf(Path(folder))
    out = {}
    for name, extra in (("plain", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": 4})):
        best, outputs = 0.0, []
        for _ in range(2):
            start, outputs = time.perf_counter(), []
            with torch.inference_mode():
                for p in prompts:
                    ids = torch.tensor([p])
                    gen = model.generate(
                        ids,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                        **extra,
                    )
                    outputs.append(gen[0, len(p) :].tolist())
            best = max(best, len(prompts) * new_tokens / (time.perf_counter() - start))
        out[name] = {"tokens_per_s": best, "outputs": outputs}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--model", type=Path, default=None, help="default: the demo model")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prompt-budget", type=int, default=110)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "jax": jax.__version__,
        "bandwidth": measure_read_bandwidth(1.0, 3),
        "runs": {},
    }
    systems = {"off": {}, "ngram": {"speculative": "ngram"}}
    hf = None
    for name, options in systems.items():
        llm = jaxllm.LLM.load(args.model, **options)
        workloads = {
            "repetitive": (repetitive_prompts(llm, 8, args.prompt_budget), 0.0),
            "novel": ([llm.tokenizer.encode(t) for t in NOVEL] * 2, 1.0),
        }
        if hf is None:
            weight_bytes = llm.config.num_params * 4
            gbps = report["bandwidth"]["best_read_gbps"]
            report["weight_bytes"] = weight_bytes
            report["limit_batch1_tokens_per_s"] = gbps * 1e9 / weight_bytes
            hf = hf_rates(llm, workloads["repetitive"][0], args.new_tokens)
        for workload, (prompts, temperature) in workloads.items():
            for batch in args.batch:
                result = run(llm, prompts, batch, args.new_tokens, temperature)
                report["runs"][f"{name}/{workload}/batch{batch}"] = result
                print(name, workload, batch, f"{result['tokens_per_s']:.1f} tok/s", flush=True)
        release(llm)

    summary = {}
    for key, result in report["runs"].items():
        name, workload, batch = key.split("/")
        if name == "off":
            continue
        base = report["runs"][f"off/{workload}/{batch}"]
        summary[f"{workload}/{batch}"] = {
            "speedup": result["tokens_per_s"] / base["tokens_per_s"],
            "acceptance": result.get("acceptance"),
            "steps_saved": 1 - result["steps"] / base["steps"],
            "identical_output": result["outputs"] == base["outputs"],
        }
    off1 = report["runs"]["off/repetitive/batch1"]["tokens_per_s"]
    ngram1 = report["runs"]["ngram/repetitive/batch1"]["tokens_per_s"]
    summary["transformers"] = {
        "plain_tokens_per_s": hf["plain"]["tokens_per_s"],
        "prompt_lookup_tokens_per_s": hf["prompt_lookup"]["tokens_per_s"],
        "its_speedup": hf["prompt_lookup"]["tokens_per_s"] / hf["plain"]["tokens_per_s"],
        "jaxllm_ngram_over_transformers_prompt_lookup": ngram1
        / hf["prompt_lookup"]["tokens_per_s"],
        "greedy_agreement_with_jaxllm": hf["plain"]["outputs"]
        == report["runs"]["off/repetitive/batch1"]["outputs"],
    }
    summary["limit"] = {
        "batch1_tokens_per_s": report["limit_batch1_tokens_per_s"],
        "jaxllm_off_fraction": off1 / report["limit_batch1_tokens_per_s"],
    }
    report["summary"] = summary
    for run_result in report["runs"].values():
        run_result.pop("outputs")
    (args.out / "bench_spec.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
