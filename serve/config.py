"""``ServeConfig``: everything ``jaxllm serve`` needs, from defaults, a YAML file and flags.

A YAML file in ``configs/`` only overrides defaults; its ``engine:`` section holds
``EngineConfig`` fields (``max_num_seqs``, ``max_seq_len``, ...), while the other ``LLM.load``
options (``mesh``, ``dtype``, ``rules``, ``quantize``, ``warm_up_prompt_logprobs``) are top-level
keys. Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxllm.distributed import DistributedConfig
from jaxllm.engine_config import EngineConfig
from jaxllm.startup import cache_option


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # HF or Orbax folder; None = the demo model
    mesh: str | None = None  # e.g. "data=2,tensor=4"; None = all local devices, tensor-parallel
    dtype: str | None = None
    rules: str | None = None
    quantize: str | None = None  # "int8": int8 weights (see jaxllm.quantize)
    # Compile the prompt-scoring pass (prompt logprobs: HTTP echo + logprobs, gRPC
    # prompt_logprobs) for every prompt-length bucket at start-up. Off, the first such request
    # of each bucket compiles on the engine thread and stalls every stream meanwhile. Of no
    # use on several processes, which refuse prompt logprobs.
    warm_up_prompt_logprobs: bool = False
    # Compiled programs kept across starts (jaxllm.startup): None = the per-user default
    # folder (~/.cache/jaxllm/xla), "off" = none, else a folder.
    compilation_cache: str | None = None
    # Decoder layers run by jax.lax.scan over stacked weights (compile time independent of
    # depth); None: scanned except on CPU (see jaxllm.model).
    scan_layers: bool | None = None
    engine: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # EngineConfig fields
    host: str = "127.0.0.1"  # loopback unless asked: the API has no auth by default
    port: int = 50051
    metrics_port: int | None = 9090  # None = no metrics endpoint
    # The OpenAI-compatible HTTP API (serve.http) on this port, beside gRPC; None = off.
    http_port: int | None = None
    # The name /v1/models lists and requests must give as "model"; None = the model folder's.
    served_model_name: str | None = None
    # A key both front ends require (HTTP "Authorization: Bearer KEY", gRPC metadata
    # "authorization: Bearer KEY"); else auth_token_file / auth_token_env below.
    api_key: str | None = None
    # Requests admitted beyond the busy slots; one more is answered RESOURCE_EXHAUSTED.
    max_queue: int = 64
    default_max_tokens: int = 16
    # Tokens per streamed message after the first (the last message may carry fewer). 1 sends
    # every token at once; more cut per-message gRPC cost at some smoothness.
    stream_interval: int = 1
    # On SIGTERM/SIGINT, in-flight streams get this long to finish before they are cancelled.
    drain_timeout_s: float = 30.0
    # Largest gRPC message and HTTP request body (HTTP: 413 beyond it).
    max_message_bytes: int = 4 * 1024 * 1024
    # gRPC streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS):
    # a client's further calls wait in its channel until one ends, as HTTP/2 prescribes.
    max_concurrent_streams: int = 128
    # HTTP connections and requests the HTTP server handles at once (HTTP/1.1 carries one
    # request at a time per connection); beyond it uvicorn answers 503 at once.
    max_http_connections: int = 512
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    # Longest JSON Schema, regex or grammar text a request's output constraint may have.
    max_structured_chars: int = 64 * 1024
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token_file: str | None = None
    # Read when no token file is given; unset or empty = no auth.
    auth_token_env: str = "JAXLLM_AUTH_TOKEN"
    # Once serving, print the greedy completion of this prompt: a check a person can read.
    sample_prompt: str | None = None
    sample_tokens: int = 48
    # Multi-host serving (see jaxllm.distributed): process 0 serves, the others follow.
    coordinator: str | None = None  # "host:port" of process 0's JAX coordination service
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False  # let JAX detect a TPU pod slice, SLURM, MPI or Kubernetes job
    # A process that stops answering on the lockstep channel for this long ends the server.
    peer_timeout_s: float = 30.0
    lockstep_port: int = 0  # process 0's side channel to the others; 0 = any free port

    def __post_init__(self):
        _check_types(self)
        object.__setattr__(self, "engine", dict(self.engine or {}))
        EngineConfig(**self.engine)  # raises on unknown or invalid engine fields
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65536), got {self.http_port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.max_queue < 0 or self.default_max_tokens < 1 or self.drain_timeout_s < 0:
            raise ValueError("max_queue, default_max_tokens and drain_timeout_s must be >= 0/1/0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        limits = ("max_message_bytes", "max_concurrent_streams", "max_http_connections")
        limits += ("max_stop_strings", "max_stop_string_chars", "max_stop_token_ids")
        limits += ("max_structured_chars", "sample_tokens")
        for name in limits:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("drain_timeout_s", "peer_timeout_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.peer_timeout_s <= 0 or not 0 <= self.lockstep_port < 65536:
            raise ValueError("peer_timeout_s must be > 0 and lockstep_port in [0, 65536)")
        # An incomplete or inconsistent process set-up fails here, before anything starts.
        DistributedConfig(self.coordinator, self.num_processes, self.process_id, self.distributed)
        several = self.distributed or self.coordinator is not None or (self.num_processes or 1) > 1
        if several and self.engine.get("speculative") == "draft":
            # The draft model's steps are not mirrored to the other processes (n-gram drafts
            # travel inside the step's inputs, so they are).
            raise ValueError("speculative: draft runs on one process only; use ngram")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ServeConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:  # jaxllm serve answers ValueErrors without a traceback
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of ServeConfig fields")
        if not all(isinstance(k, str) for k in data):
            raise ValueError(f"{path}: every key must be a ServeConfig field name (a string)")
        return cls.from_dict({**data, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> ServeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown ServeConfig fields {unknown}")
        return cls(**data)

    def replace(self, **changes) -> ServeConfig:
        """Copies with ``changes`` applied; ``engine`` changes merge into the engine section."""
        engine = {**self.engine, **changes.pop("engine", {})}
        return dataclasses.replace(self, engine=engine, **changes)

    @property
    def load_options(self) -> dict[str, Any]:
        """``LLM.load`` keyword arguments besides the path. Every process of a multi-host
        server loads with these: they decide which programs it compiles."""
        options = dict(mesh=self.mesh, dtype=self.dtype, rules=self.rules, quantize=self.quantize)
        options["warm_up_prompt_logprobs"] = self.warm_up_prompt_logprobs
        options["compilation_cache"] = cache_option(self.compilation_cache)
        options["scan_layers"] = self.scan_layers
        return {**options, **self.engine}

    @property
    def distributed_config(self) -> DistributedConfig:
        # Before the lockstep channel exists (loading, compiling), JAX's coordination service
        # is what notices a dead process; give it the same patience.
        return DistributedConfig(
            self.coordinator,
            self.num_processes,
            self.process_id,
            auto=self.distributed,
            heartbeat_timeout_s=max(10, round(self.peer_timeout_s)),
        )

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.engine)


# What each field's annotation admits (a YAML file or a caller can hand over any type; a wrong
# one must be a clear error, not a comparison failing deep inside).
_KINDS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_types(config: ServeConfig) -> None:
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        spelled = str(field.type).replace(" ", "")
        optional = spelled.endswith("|None")
        kinds = _KINDS.get(spelled.removesuffix("|None"))
        if kinds is None:  # engine: a mapping, checked by EngineConfig
            if field.name == "engine" and not isinstance(value, Mapping | None):
                raise TypeError(f"engine must be a mapping of EngineConfig fields, got {value!r}")
            continue
        if value is None and optional:
            continue
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if wrong_bool or not isinstance(value, kinds):
            raise TypeError(f"{field.name} must be {spelled.replace('|', ' or ')}, got {value!r}")
