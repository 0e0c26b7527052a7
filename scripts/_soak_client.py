"""The client that scripts/soak.py kills: it streams one long completion and says on stdout
when the first piece has arrived, so that the soak can SIGKILL it mid-stream.

    python scripts/_soak_client.py grpc 127.0.0.1:50051
    python scripts/_soak_client.py http http://127.0.0.1:8000 MODEL

It prints ``first`` after the first piece and ``end OUTCOME`` if it lives to see the stream
end (``ok``, a gRPC status name or an HTTP status). Only light imports (grpc, httpx): every
killed client is a new interpreter, started on the cores the server computes on.
"""

from __future__ import annotations

import json
import sys

# Long enough that the stream is still running when the soak kills it (tenths of a second
# after the first piece), short enough for the demo model's 256-token context.
PROMPT, MAX_TOKENS = "def main(argv):\n", 200


def _say(line: str) -> None:
    print(line, flush=True)


def _grpc(target: str) -> str:
    import grpc

    from serve.client import Client

    with Client(target) as client:
        stream = client.generate_stream(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
        try:
            for i, _ in enumerate(stream):
                if i == 0:
                    _say("first")
        except grpc.RpcError as e:
            return e.code().name
    return "ok"


def _http(base: str, model: str) -> str:
    import httpx

    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as response:
        if response.status_code != 200:
            return str(response.status_code)
        first = True
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if "error" in json.loads(line[6:]):
                return "error_event"
            if first:
                _say("first")
                first = False
    return "ok"


def main() -> None:
    api, *where = sys.argv[1:]
    outcome = _grpc(*where) if api == "grpc" else _http(*where)
    _say(f"end {outcome}")


if __name__ == "__main__":
    main()
