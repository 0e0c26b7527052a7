"""The ``jaxllm`` console script: the model commands of ``jaxllm.cli`` plus the server's.

    jaxllm serve [--model PATH] [--config configs/demo.yaml] [--mesh data=2,tensor=4]
                 [--host 127.0.0.1] [--port 50051] [--metrics-port 9090]
                 [--tls-cert CERT --tls-key KEY] [--auth-token-file FILE]
    jaxllm generate --server HOST:PORT [sampling flags] PROMPT

It lives here because ``jaxllm`` never imports ``serve``; it extends jaxllm's parser.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from jaxllm import cli as model_cli


def _serve(args) -> int:
    from serve.config import ServeConfig
    from serve.server import serve

    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    flags = {
        name: getattr(args, name)
        for name in ("model", "mesh", "dtype", "rules", "quantize", "host", "port")
        + ("metrics_port",)
        + ("max_queue", "tls_cert", "tls_key", "auth_token_file", "drain_timeout_s")
        + ("stream_interval", "sample_prompt")
        if getattr(args, name) is not None
    }
    if args.no_metrics:
        flags["metrics_port"] = None
    engine = {
        name: getattr(args, name)
        for name in ("max_slots", "max_seq_len", "max_prompt_len", "steps_per_call")
        + ("kv_cache_dtype",)
        if getattr(args, name) is not None
    }
    config = config.replace(engine=engine, **flags)
    logging.basicConfig(
        level=os.environ.get("JAXLLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # jax and absl may have configured the root logger already
    )
    return asyncio.run(serve(config))


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

    srv = commands.add_parser("serve", help="serve a model over gRPC")
    srv.add_argument("--config", help="YAML of ServeConfig overrides (see configs/)")
    model_cli.add_model_args(srv)
    srv.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    srv.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9090)")
    srv.add_argument("--no-metrics", action="store_true", help="no metrics endpoint")
    srv.add_argument("--max-slots", type=int, help="requests decoded together")
    srv.add_argument("--max-prompt-len", type=int, help="longest prompt in tokens")
    srv.add_argument("--steps-per-call", type=int, help="decode steps per device call")
    srv.add_argument("--max-queue", type=int, help="requests waiting beyond the slots")
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
    srv.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what, not a traceback
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
