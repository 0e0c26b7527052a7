"""The ``jaxllm`` command line.

    jaxllm generate [--model PATH] [--mesh data=2,tensor=4] [sampling flags] PROMPT
    jaxllm convert HF_DIR|MODEL.gguf OUT_DIR [--dtype bfloat16] [--quantize int8]
    jaxllm info [--model PATH] [--mesh ...]
    jaxllm prune [--model PATH] OUT_DIR --mlp-fraction 0.25 [--calibration FILE ...]

Without ``--model`` the embedded demo model is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# jaxllm.quantize.METHOD_NAMES, spelled out so that parsing flags does not import jax.
QUANTIZE_METHODS = (
    "int8",
    "int8-g32",
    "int8-g64",
    "int8-g128",
    "int4",
    "int4-g32",
    "int4-g64",
    "int4-g128",
)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face model folder (default: demo model)")
    parser.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4 (default: tensor=all)")
    parser.add_argument("--dtype", help="parameter dtype (default: float32 on CPU, else bfloat16)")
    parser.add_argument("--rules", help="sharding preset (default: fsdp_tensor)")
    parser.add_argument("--max-seq-len", type=int, help="context length of the KV cache")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_METHODS,
        help="int8 (per-channel scales) or int4 (groups of 32; -g64/-g128) weights, at load",
    )
    parser.add_argument(
        "--kv-cache-dtype", choices=["int8"], help="int8 KV cache: ~3.8x the tokens per byte"
    )
    parser.add_argument(
        "--compilation-cache",
        metavar="DIR|off",
        help="keep compiled programs here across starts (default ~/.cache/jaxllm/xla; off: none)",
    )


def _load(args, warm_up: bool):
    from jaxllm import startup
    from jaxllm.llm import LLM

    options = {"max_seq_len": args.max_seq_len} if args.max_seq_len else {}
    if args.kv_cache_dtype:
        options["kv_cache_dtype"] = args.kv_cache_dtype
    return LLM.load(
        args.model,
        mesh=args.mesh,
        dtype=args.dtype,
        rules=args.rules,
        quantize=args.quantize,
        warm_up=warm_up,
        compilation_cache=startup.cache_option(args.compilation_cache),
        **options,
    )


def sampling_args(args) -> dict:
    """The ``generate`` command's sampling flags as keyword arguments (local or server)."""
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )


def generate_locally(args) -> int:
    # One prompt needs one prefill bucket: compile on demand instead of warming up all.
    llm = _load(args, warm_up=False)
    sampling = sampling_args(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    start = time.perf_counter()
    sys.stdout.write(args.prompt if not args.chat else "")
    for piece in llm.stream(prompt, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(f"\n[{llm.name}: {time.perf_counter() - start:.2f} s]", file=sys.stderr)
    llm.close()
    return 0


def _convert(args) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from jaxllm.gguf_checkpoint import is_gguf_file
    from jaxllm.orbax_checkpoint import convert_gguf_to_orbax, convert_hf_to_orbax

    # A GGUF file (by its magic bytes) or a Hugging Face folder.
    gguf = is_gguf_file(args.hf_dir)
    # Bytes as stored; a --dtype cast changes what is written, not how much is read. A GGUF
    # file's quantized bytes say nothing of what its dequantized tensors will weigh.
    total = None if gguf else sum(f.stat().st_size for f in Path(args.hf_dir).glob("*.safetensors"))
    convert = convert_gguf_to_orbax if gguf else convert_hf_to_orbax
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting") as bar:

        def progress(name: str, nbytes: int) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(nbytes)

        out = convert(
            args.hf_dir, args.out_dir, dtype=args.dtype, quantize=args.quantize, on_tensor=progress
        )
    print(f"wrote {out}")
    return 0


def _info(args) -> int:
    import jax.numpy as jnp

    from jaxllm.params import param_bytes
    from sharding import describe_mesh

    llm = _load(args, warm_up=False)
    cfg = llm.config
    info = {
        "model": llm.name,
        "architecture": cfg.architecture,
        "parameters": cfg.num_params,
        "layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "max_seq_len": llm.max_seq_len,
        "dtype": jnp.dtype(llm.runner.spec.dtype).name,
        "quantized": llm.runner.spec.quantized,
        "kv_cache_dtype": llm.engine.config.kv_cache_dtype,
        "weight_bytes": param_bytes(llm.runner.state),
        "mesh": describe_mesh(llm.mesh),
        "rules": llm.runner.spec.rules.name,
    }
    print(json.dumps(info, indent=2))
    llm.close()
    return 0


def _prune(args) -> int:
    from pathlib import Path

    from jaxllm import prune

    def read(files):
        if not files:
            return None
        return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]

    try:
        record = prune.prune_checkpoint(
            args.model,
            args.out_dir,
            mlp_fraction=args.mlp_fraction,
            heads_fraction=args.heads_fraction,
            calibration_text=read(args.calibration),
            eval_text=read(args.eval),
            multiple=args.multiple,
            calibration_windows=args.calibration_windows,
            eval_windows=args.eval_windows,
            random_seed=args.random_seed,
            mesh=args.mesh,
            log=lambda line: print(line, file=sys.stderr),
        )
    except FileExistsError as e:
        raise ValueError(str(e)) from e
    params, width, ppl = record["params"], record["intermediate_size"], record["perplexity"]
    print(f"MLP channel importance: {record['measure']['mlp']}")
    print(f"MLP width: {width['before']} -> {width['after']} channels in every layer")
    if args.heads_fraction:
        heads, kv = record["num_heads"], record["num_kv_heads"]
        print(f"head importance: {record['measure']['heads']}")
        print(
            f"heads: {heads['before']} -> {heads['after']} query, {kv['before']} -> "
            f"{kv['after']} key/value in every layer"
        )
    change = params["after"] / params["before"] - 1
    print(f"parameters: {params['before']:,} -> {params['after']:,} ({change:+.1%})")
    change = ppl["after"] / ppl["before"] - 1
    print(
        f"held-out perplexity ({ppl['tokens']} tokens, {ppl['source']}): "
        f"{ppl['before']:.2f} -> {ppl['after']:.2f} ({change:+.1%})"
    )
    print(f"wrote {args.out_dir} (pruning.json beside config.json records these)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    return build_commands()[0]


def build_commands() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser and its subcommands, for front ends (``serve.cli``) that add their own."""
    parser = argparse.ArgumentParser(prog="jaxllm", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete a prompt, streaming to the terminal")
    add_model_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(run=generate_locally)

    convert = commands.add_parser(
        "convert", help="Hugging Face folder or GGUF file -> Orbax checkpoint"
    )
    convert.add_argument("hf_dir", metavar="HF_DIR|MODEL.gguf")
    convert.add_argument("out_dir")
    convert.add_argument("--dtype", help="store as this dtype (default: as in the checkpoint)")
    convert.add_argument(
        "--quantize",
        choices=QUANTIZE_METHODS,
        help="store int8 (per-channel scales) or int4 (groups of 32; -g64/-g128) weights",
    )
    convert.set_defaults(run=_convert)

    info = commands.add_parser("info", help="describe the loaded model and its layout")
    add_model_args(info)
    info.set_defaults(run=_info)

    # Cheap: importing the jaxllm package has already imported the runtime it uses.
    from jaxllm.prune import DEFAULT_MULTIPLE, HEAD_MEASURE, MEASURE

    prune = commands.add_parser(
        "prune",
        help="remove the least important MLP channels; write a smaller Orbax checkpoint",
        description=f"Structured pruning. MLP channel importance: {MEASURE}. Head importance: "
        f"{HEAD_MEASURE}. Every layer keeps the same number of its highest-scored channels "
        "(and heads); prints parameters and held-out perplexity before and after and records "
        "them in OUT_DIR/pruning.json.",
    )
    prune.add_argument("out_dir", help="new folder for the pruned checkpoint")
    prune.add_argument("--model", help="jaxllm Orbax checkpoint (default: the demo model)")
    prune.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4 (default: tensor=all)")
    prune.add_argument(
        "--mlp-fraction",
        type=float,
        required=True,
        help="fraction of each layer's MLP channels to remove, in [0, 1)",
    )
    prune.add_argument(
        "--heads-fraction",
        type=float,
        default=0.0,
        help="fraction of query heads to remove, in [0, 1) (default 0): the same number from "
        "every KV group, at most that fraction; with one query head per KV head, whole heads "
        "with their key/value heads",
    )
    prune.add_argument(
        "--multiple",
        type=int,
        default=DEFAULT_MULTIPLE,
        help="round the kept width up to a multiple of this, e.g. the tensor-parallel degree "
        f"(default {DEFAULT_MULTIPLE})",
    )
    prune.add_argument(
        "--calibration",
        action="append",
        metavar="FILE",
        help="text file whose activations score the channels (repeatable; default for the "
        "demo model: half of its held-out stdlib files; required for other models)",
    )
    prune.add_argument(
        "--eval",
        action="append",
        metavar="FILE",
        help="other text for the perplexities (repeatable; default: the demo model's other "
        "held-out half, else the last fifth of the calibration text, kept out of calibration)",
    )
    prune.add_argument("--calibration-windows", type=int, default=128, help="256-token windows")
    prune.add_argument("--eval-windows", type=int, default=128, help="256-token windows")
    prune.add_argument(
        "--random-seed",
        type=int,
        help="remove random channels instead (the baseline the measure should beat)",
    )
    prune.set_defaults(run=_prune)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, not a traceback
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
