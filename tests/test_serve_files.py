"""Files the server ships with: generated stubs that match the proto, and YAML presets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.engine_config import EngineConfig
from serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[1]
STUBS = ("jaxllm_pb2.py", "jaxllm_pb2.pyi", "jaxllm_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "scripts/gen_proto.sh"), str(tmp_path)], check=True, env=env)
    for name in STUBS:
        fresh = (tmp_path / name).read_text()
        committed = (REPO / "serve/proto" / name).read_text()
        assert fresh == committed, f"serve/proto/{name} is stale: run scripts/gen_proto.sh"


def test_stubs_carry_the_design_names():
    from serve.proto import jaxllm_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["LLM"]
    assert service.full_name == "jaxllm.v1.LLM"
    generate = service.methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    assert generate.input_type.name == "GenerateRequest"
    fields = lambda m: set(m.DESCRIPTOR.fields_by_name)  # noqa: E731
    assert {"prompt", "token_ids", "sampling", "request_id"} <= fields(pb.GenerateRequest)
    assert {"text", "token_ids", "finish_reason", "usage"} <= fields(pb.GenerateResponse)
    assert {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"} <= fields(
        pb.SamplingParams
    )


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    config = ServeConfig.from_yaml(path)
    assert isinstance(config.engine_config, EngineConfig)
    assert config.host == "127.0.0.1"  # exposing the port is a deliberate --host


def test_configs_exist():
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {"demo.yaml", "llama3_8b_tp8.yaml", "qwen3_8b_tp8.yaml", "gemma3_12b_tp8.yaml"} <= names
    assert {"mixtral_8x7b_ep4_tp2.yaml", "qwen3_30b_a3b_ep8.yaml"} <= names


def test_unknown_config_keys_are_errors(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("max_queue: 4\nmax_qeueu: 5\n")
    with pytest.raises(ValueError, match="max_qeueu"):
        ServeConfig.from_yaml(path)
    path.write_text("engine:\n  max_slotz: 4\n")
    with pytest.raises(TypeError, match="max_slotz"):
        ServeConfig.from_yaml(path)


def test_flags_override_the_file_and_engine_fields_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("port: 1234\nengine:\n  max_num_seqs: 4\n  max_seq_len: 256\n")
    config = ServeConfig.from_yaml(path).replace(port=4321, engine={"max_num_seqs": 2})
    assert config.port == 4321
    assert config.engine_config == EngineConfig(max_num_seqs=2, max_seq_len=256)


def test_gen_proto_script_is_executable():
    assert shutil.which("bash") and os.access(REPO / "scripts/gen_proto.sh", os.X_OK)


def test_warm_up_prompt_logprobs_reaches_the_engine(tmp_path, monkeypatch):
    """The YAML key and the flag both become the engine's setting through the server's own
    load; a file's true survives a command line without the flag."""
    from jaxllm.engine import Engine
    from serve import cli, server
    from serve.metrics import Metrics
    from server_process import write_model

    path = tmp_path / "c.yaml"
    path.write_text("warm_up_prompt_logprobs: true\n")
    parse = cli.build_parser().parse_args
    assert cli.serve_config(parse(["serve", "--config", str(path)])).warm_up_prompt_logprobs
    assert not cli.serve_config(parse(["serve"])).warm_up_prompt_logprobs
    model = write_model(tmp_path / "model")
    args = ["serve", "--model", str(model), "--max-seq-len", "64", "--warm-up-prompt-logprobs"]
    config = cli.serve_config(parse(args))
    # What warm-up compiles is the engine's business (tests/test_engine.py); here only
    # whether the setting arrived.
    seen = []
    monkeypatch.setattr(Engine, "warm_up", lambda engine: seen.append(engine))
    llm = server._load(config, Metrics())
    try:
        assert seen == [llm.engine] and llm.engine.warm_up_prompt_logprobs is True
    finally:
        llm.close()
