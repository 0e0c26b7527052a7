"""The ``jaxllm`` console script: the model commands of ``jaxllm.cli`` plus the server's.

    jaxllm serve [--model PATH] [--config configs/demo.yaml] [--mesh data=2,tensor=4]
                 [--host 127.0.0.1] [--port 50051] [--metrics-port 9090] [--http-port 8000]
                 [--api-key KEY] [--warm-up-prompt-logprobs]
                 [--speculative ngram|draft [--num-speculative-tokens 4] [--draft-model PATH]]
                 [--tls-cert CERT --tls-key KEY] [--auth-token-file FILE]
    jaxllm generate --server HOST:PORT [sampling flags] PROMPT
    jaxllm serve --coordinator HOST:PORT --num-processes N --process-id I ...   (multi-host)
    jaxllm cluster-info [--distributed | --coordinator ...]

It lives here because ``jaxllm`` never imports ``serve``; it extends jaxllm's parser.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from jaxllm import cli as model_cli

if TYPE_CHECKING:
    from serve.config import ServeConfig

# Multi-host start-up flags and the variables they fall back to (launch scripts and the
# Kubernetes manifests set these; TPU pods and SLURM need none: --distributed detects them).
_PROCESS_FLAGS = {
    "coordinator": "JAXLLM_COORDINATOR",
    "num_processes": "JAXLLM_NUM_PROCESSES",
    "process_id": "JAXLLM_PROCESS_ID",
}


def _process_flags(args) -> dict:
    flags = {}
    for name, variable in _PROCESS_FLAGS.items():
        value = getattr(args, name)
        if value is None and os.environ.get(variable):
            value = os.environ[variable]
            if name != "coordinator":
                if not value.strip().isdigit():
                    raise ValueError(f"${variable} must be a non-negative integer, got {value!r}")
                value = int(value)
        if value is not None:
            flags[name] = value
    if args.distributed:
        flags["distributed"] = True
    return flags


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("JAXLLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # jax and absl may have configured the root logger already
    )
    # Orbax logs every array it restores at INFO through absl (300+ lines for the demo model).
    logging.getLogger("absl").setLevel(logging.WARNING)


def serve_config(args) -> ServeConfig:
    """The ``serve`` command's settings: the ``--config`` file (or the defaults), then the
    flags given."""
    from serve.config import ServeConfig

    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    flags = {
        name: getattr(args, name)
        for name in ("model", "mesh", "dtype", "rules", "quantize", "warm_up_prompt_logprobs")
        + ("compilation_cache", "host", "port")
        + ("metrics_port", "http_port", "served_model_name", "api_key")
        + ("max_queue", "tls_cert", "tls_key", "auth_token_file", "drain_timeout_s")
        + ("stream_interval", "sample_prompt", "peer_timeout_s", "lockstep_port")
        if getattr(args, name) is not None
    }
    flags.update(_process_flags(args))
    if args.no_metrics:
        flags["metrics_port"] = None
    engine = {
        name: getattr(args, name)
        for name in ("max_num_seqs", "max_seq_len", "max_step_tokens", "kv_cache_bytes")
        + ("kv_cache_dtype", "page_size", "speculative", "num_speculative_tokens", "draft_model")
        if getattr(args, name) is not None
    }
    return config.replace(engine=engine, **flags)


def _serve(args) -> int:
    from jaxllm import distributed

    config = serve_config(args)
    _setup_logging()
    # Before anything touches a device: afterwards jax.devices() spans every process.
    distributed.initialize(config.distributed_config)
    import jax

    if jax.process_index() > 0:
        from serve.multihost import follow

        return follow(config)
    from serve.server import serve

    return asyncio.run(serve(config))


def _cluster_info(args) -> int:
    """Joins the other processes, checks that a collective spans them all, prints the set-up."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxllm import distributed
    from serve.config import ServeConfig

    _setup_logging()
    config = ServeConfig(**_process_flags(args)).distributed_config
    distributed.initialize(config)
    indices = multihost_utils.process_allgather(np.array([jax.process_index()], np.int32))
    print(
        f"jaxllm: {distributed.describe()}; all-gather saw processes "
        f"{sorted(np.asarray(indices).ravel().tolist())}",
        flush=True,
    )
    # Leave through JAX's shutdown barrier while every process is still alive: left to the
    # interpreter's exit, process 0 can take the coordination service down while a peer is
    # still leaving, and that peer hangs or aborts.
    jax.distributed.shutdown()
    return 0


def _add_process_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 ($JAXLLM_COORDINATOR)")
    parser.add_argument("--num-processes", type=int, help="processes ($JAXLLM_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="this process ($JAXLLM_PROCESS_ID)")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="detect the processes as JAX does (TPU pod slice, SLURM, MPI, Kubernetes)",
    )


def _generate(args) -> int:
    if not args.server:
        return model_cli.generate_locally(args)
    if args.chat:
        raise ValueError("--chat needs --model (the chat template is applied locally)")
    token = None
    if args.auth_token_file:
        with open(args.auth_token_file) as f:
            token = f.read().strip()
    token = token or os.environ.get("JAXLLM_AUTH_TOKEN") or None
    sampling = model_cli.sampling_args(args)
    start = time.perf_counter()
    import grpc

    try:
        result = _stream_to_terminal(args, token, sampling)
    except grpc.RpcError as e:
        print(f"\njaxllm: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    usage = result.usage if result is not None else None
    tokens = f"{usage.completion_tokens} tokens, " if usage else ""
    reason = result.finish_reason if result is not None else "?"
    print(
        f"\n[{args.server}: {tokens}{reason}, {time.perf_counter() - start:.2f} s]", file=sys.stderr
    )
    return 0


def _stream_to_terminal(args, token, sampling):
    from serve.client import Client

    result = None
    with Client(args.server, token=token, ca_cert=args.tls_ca, server_name=args.server_name) as c:
        sys.stdout.write(args.prompt)
        for message in c.generate_stream(args.prompt, timeout=args.timeout, **sampling):
            sys.stdout.write(message.text)
            sys.stdout.flush()
            result = message
    return result


def build_parser() -> argparse.ArgumentParser:
    parser, commands = model_cli.build_commands()

    gen = commands.choices["generate"]
    gen.add_argument("--server", help="HOST:PORT of a jaxllm server (comma-separate several)")
    gen.add_argument("--tls-ca", help="CA certificate that signed the server's (enables TLS)")
    gen.add_argument("--server-name", help="name in the server's certificate, if not the host")
    gen.add_argument("--auth-token-file", help="bearer token file (else $JAXLLM_AUTH_TOKEN)")
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    gen.set_defaults(run=_generate)

    srv = commands.add_parser("serve", help="serve a model over gRPC (and HTTP: --http-port)")
    srv.add_argument("--config", help="YAML of ServeConfig overrides (see configs/)")
    model_cli.add_model_args(srv)
    srv.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    srv.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9090)")
    srv.add_argument("--no-metrics", action="store_true", help="no metrics endpoint")
    srv.add_argument(
        "--http-port", type=int, help="OpenAI-compatible HTTP API on this port (default: off)"
    )
    srv.add_argument("--served-model-name", help="the model name clients send (default: folder)")
    srv.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on HTTP and gRPC (or use --auth-token-file)",
    )
    srv.add_argument(
        "--warm-up-prompt-logprobs",
        action="store_true",
        default=None,
        help="compile prompt-logprob scoring (HTTP echo+logprobs, gRPC prompt_logprobs) for "
        "every power-of-two prompt-length bucket at start-up: longer start-up. Without it the "
        "first such request of each bucket compiles on the engine thread, stalling every "
        "stream meanwhile",
    )
    srv.add_argument("--max-num-seqs", type=int, help="sequences running at once (default 64)")
    srv.add_argument(
        "--max-step-tokens", type=int, help="tokens one engine step computes (default 256)"
    )
    srv.add_argument("--kv-cache-bytes", type=int, help="KV pool size in bytes")
    srv.add_argument("--page-size", type=int, help="tokens per KV page (default 16)")
    srv.add_argument(
        "--speculative",
        choices=["ngram", "draft"],
        help="speculative decoding: draft by prompt lookup (ngram) or with --draft-model",
    )
    srv.add_argument(
        "--num-speculative-tokens", type=int, help="tokens drafted per step, 1..16 (default 4)"
    )
    srv.add_argument(
        "--draft-model", help="checkpoint of the draft model (--speculative draft; same tokenizer)"
    )
    srv.add_argument("--max-queue", type=int, help="requests waiting beyond max_num_seqs")
    srv.add_argument("--stream-interval", type=int, help="tokens per message after the first")
    srv.add_argument("--drain-timeout-s", type=float, help="grace for streams on SIGTERM")
    srv.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: TLS on)")
    srv.add_argument("--tls-key", help="PEM private key")
    srv.add_argument(
        "--auth-token-file",
        help="require 'authorization: Bearer <token>' (else $JAXLLM_AUTH_TOKEN)",
    )
    srv.add_argument(
        "--sample",
        dest="sample_prompt",
        metavar="PROMPT",
        help="once serving, print the model's greedy completion of PROMPT",
    )
    _add_process_args(srv)
    srv.add_argument(
        "--peer-timeout-s", type=float, help="multi-host: end the server if a process is silent"
    )
    srv.add_argument("--lockstep-port", type=int, help="multi-host: process 0's side channel")
    srv.set_defaults(run=_serve)

    info = commands.add_parser(
        "cluster-info", help="join the other processes and check a collective spans them"
    )
    _add_process_args(info)
    info.set_defaults(run=_cluster_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, not a traceback
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a port in use, a file that cannot be read: the same
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
