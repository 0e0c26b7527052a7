"""Speculative decoding: tokens/s with and without it, in one run, against transformers'
prompt lookup on the same weights, and the memory-bandwidth limit.

The demo model (default; or ``--model PATH``) in one process with one CPU device, the
library's defaults plus ``speculative``:

- workloads where drafting should help, greedy: ``copy`` (a piece of standard-library source
  followed by its first lines again: continuing means copying, as in editing or quoting) and
  ``repeat`` (a few lines of source written twice: the model continues the pattern); and one
  where drafts should mostly fail: ``novel`` (temperature 1.0, seeded; short prompts);
- at batch 1 (one request at a time) and batch 4 (submitted together);
- jaxllm without speculation and with n-gram drafting (``speculative="ngram"``, the default
  k = 4), both loaded in this process, rounds alternating between them, best kept; and
  transformers ``generate`` on the same weights without and with ``prompt_lookup_num_tokens``
  (batch 1, ``copy``; its prompt lookup takes one sequence);
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


def _sources(llm: jaxllm.LLM, budget: int) -> list[str]:
    """Standard-library functions' source, cut to ``budget`` tokens."""
    import fnmatch
    import heapq
    import json as json_module
    import shutil
    import string
    import textwrap

    texts = []
    for fn in (textwrap.dedent, textwrap.indent, json_module.dumps, inspect.getdoc):
        texts.append(inspect.getsource(fn))
    for fn in (string.capwords, fnmatch.translate, heapq.nsmallest, shutil.copyfileobj):
        texts.append(inspect.getsource(fn))
    return [llm.tokenizer.decode(llm.tokenizer.encode(t)[:budget]) for t in texts]


def workloads(llm: jaxllm.LLM, budget: int) -> dict[str, tuple[list[list[int]], float]]:
    """(prompts, temperature) of each workload (the module's docstring)."""
    encode = llm.tokenizer.encode
    copy, repeat = [], []
    for text in _sources(llm, budget):
        lines = text.splitlines()
        copy.append(encode(text + "\n\n" + "\n".join(lines[:2]) + "\n"))
        block = llm.tokenizer.decode(encode("\n".join(lines[1:5]) + "\n")[: budget // 3])
        repeat.append(encode(block * 2 + "\n"))
    return {
        "copy": (copy, 0.0),
        "repeat": (repeat, 0.0),
        "novel": ([encode(t) for t in NOVEL] * 2, 1.0),
    }


NOVEL = ["def parse_header(line):", "class Cache:", "import os\n\ndef main():", "for item in "]


def one_round(llm, prompts, batch: int, new_tokens: int, temperature: float) -> dict:
    """Every prompt once, ``batch`` at a time."""
    before = llm.engine.stats()
    outputs, start = [], time.perf_counter()
    with noise_meter() as noise:
        for i in range(0, len(prompts), batch):
            group = prompts[i : i + batch]
            params = [
                jaxllm.SamplingParams(
                    max_tokens=new_tokens, temperature=temperature, seed=i + j, ignore_eos=True
                )
                for j in range(len(group))
            ]
            reqs = [llm.engine.submit(p, s) for p, s in zip(group, params, strict=True)]
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
    return result


def interleaved(llms: dict, prompts, batch, new_tokens, temperature, rounds: int) -> dict:
    """The best round of each system, rounds alternating between systems (this machine's
    speed drifts by tens of percent over minutes: alternating keeps the comparison fair)."""
    best = {}
    for _ in range(rounds):
        for name, llm in llms.items():
            result = one_round(llm, prompts, batch, new_tokens, temperature)
            if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = result
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
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "jax": jax.__version__,
        "bandwidth": measure_read_bandwidth(1.0, 3),
        "runs": {},
    }
    systems = {"off": {}, "ngram": {"speculative": "ngram"}}
    llms = {name: jaxllm.LLM.load(args.model, **options) for name, options in systems.items()}
    some = llms["off"]
    loads = workloads(some, args.prompt_budget)
    report["weight_bytes"] = some.config.num_params * 4
    report["limit_batch1_tokens_per_s"] = (
        report["bandwidth"]["best_read_gbps"] * 1e9 / report["weight_bytes"]
    )
    hf = hf_rates(some, loads["copy"][0], args.new_tokens)
    for workload, (prompts, temperature) in loads.items():
        for batch in args.batch:
            best = interleaved(llms, prompts, batch, args.new_tokens, temperature, args.rounds)
            for name, result in best.items():
                report["runs"][f"{name}/{workload}/batch{batch}"] = result
                print(name, workload, batch, f"{result['tokens_per_s']:.1f} tok/s", flush=True)
    for llm in llms.values():
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
    off1 = report["runs"]["off/copy/batch1"]["tokens_per_s"]
    ngram1 = report["runs"]["ngram/copy/batch1"]["tokens_per_s"]
    summary["transformers"] = {
        "plain_tokens_per_s": hf["plain"]["tokens_per_s"],
        "prompt_lookup_tokens_per_s": hf["prompt_lookup"]["tokens_per_s"],
        "its_speedup": hf["prompt_lookup"]["tokens_per_s"] / hf["plain"]["tokens_per_s"],
        "jaxllm_ngram_over_transformers_prompt_lookup": ngram1
        / hf["prompt_lookup"]["tokens_per_s"],
        "greedy_agreement_with_jaxllm": hf["plain"]["outputs"]
        == report["runs"]["off/copy/batch1"]["outputs"],
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
