"""The notebook API: ``LLM.load`` a model, then ``generate``, ``stream``, ``logits``.

This front end runs one sequence at a time through the jitted prefill/decode steps with
on-device sampling; the continuous-batching engine takes its place for many prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxllm import demo, padding
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import load_hf_state
from jaxllm.params import ModelSpec
from jaxllm.request_output import RequestOutput
from jaxllm.runtime import ModelRunner
from jaxllm.sampling import SamplingArrays, SamplingParams
from jaxllm.tokenizer import Tokenizer
from sharding import ShardingRules, get_rules, make_mesh

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length" (max_tokens)
    prompt_token_ids: list[int]


def default_dtype():
    # XLA's CPU backend runs bfloat16 matmuls ~25x slower than float32 (measured here).
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


class LLM:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, max_seq_len: int, name: str):
        self.runner = runner
        self.tokenizer = tokenizer
        self.name = name
        self.max_seq_len = max_seq_len
        self.buckets = padding.prefill_buckets(max_seq_len)
        self._cache = runner.new_cache(1, max_seq_len)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        mesh: Mesh | dict[str, int] | str | None = None,
        dtype=None,
        rules: ShardingRules | str | None = None,
        max_seq_len: int | None = None,
        seed: int = 0,
    ) -> LLM:
        """Loads a Hugging Face folder (config.json + *.safetensors + tokenizer), or with
        ``path=None`` the embedded demo model, sharded over ``mesh`` by ``rules``."""
        mesh = make_mesh(mesh)
        dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
        if path is None:
            config, tokenizer = demo.random_demo()
            spec = ModelSpec(config, dtype, mesh, get_rules(rules))
            graphdef, state = spec.random_state(seed)
            name = "random-demo"
        else:
            path = Path(path)
            if not path.is_dir():
                raise FileNotFoundError(f"model folder {path} does not exist")
            config = ModelConfig.from_hf_dir(path)
            tokenizer = Tokenizer.from_dir(path)
            spec = ModelSpec(config, dtype, mesh, get_rules(rules))
            total = config.num_params * jnp.dtype(dtype).itemsize
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}") as bar:
                graphdef, state = load_hf_state(path, spec, lambda _, n: bar.update(n))
            name = path.name
        max_seq_len = min(max_seq_len or 2048, config.max_position_embeddings)
        return cls(ModelRunner(spec, graphdef, state), tokenizer, max_seq_len, name)

    @property
    def config(self) -> ModelConfig:
        return self.runner.config

    @property
    def mesh(self) -> Mesh:
        return self.runner.spec.mesh

    # -- generation ---------------------------------------------------------------------

    def generate(
        self, prompts: Prompt | Sequence[Prompt], **sampling
    ) -> Completion | list[Completion]:
        """Completes one prompt (text or token ids) or a list of them.

        Keyword arguments are ``SamplingParams`` fields: ``max_tokens``, ``temperature``
        (0 = greedy), ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``stop_token_ids``,
        ``ignore_eos``.
        """
        params = SamplingParams(**sampling)
        if _is_single(prompts):
            return self._complete(prompts, params)
        return [self._complete(p, params) for p in prompts]

    def stream(self, prompt: Prompt, **sampling) -> Iterator[str]:
        """Yields text pieces as they are decoded (never half a UTF-8 character)."""
        params = SamplingParams(**sampling)
        for piece in self._run(self._prompt_ids(prompt), params, RequestOutputSink()):
            if piece:
                yield piece

    def _complete(self, prompt: Prompt, params: SamplingParams) -> Completion:
        prompt_ids = self._prompt_ids(prompt)
        sink = RequestOutputSink()
        for _ in self._run(prompt_ids, params, sink):
            pass
        out = sink.output
        return Completion(out.text, out.token_ids, out.finish_reason, prompt_ids)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt is empty")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.config.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def _check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len >= self.max_seq_len:
            raise ValueError(
                f"prompt has {prompt_len} tokens; this model's context is {self.max_seq_len} "
                "tokens and prompts are never truncated"
            )
        if prompt_len + max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"context of {self.max_seq_len} tokens; lower max_tokens to at most "
                f"{self.max_seq_len - prompt_len}"
            )

    def _run(self, prompt_ids: list[int], params: SamplingParams, sink) -> Iterator[str]:
        self._check_fits(len(prompt_ids), params.max_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        sampling = SamplingArrays.from_params([params], [seed])
        out = RequestOutput(self.tokenizer, params, prompt_ids)
        sink.output = out
        runner, n = self.runner, len(prompt_ids)
        bucket = padding.bucket_for(n, self.buckets)
        tokens = padding.pad_to(prompt_ids, bucket)[None]
        token, self._cache = runner.prefill(
            runner.params,
            tokens,
            np.array([n], np.int32),
            self._cache,
            sampling,
            np.zeros((1,), np.int32),
        )
        for i in range(params.max_tokens):
            current = token
            if i + 1 < params.max_tokens:
                # Queue the next step before reading this token, so the device stays busy
                # while the host detokenizes; at most one step is wasted at a stop.
                token, self._cache = runner.decode(
                    runner.params,
                    current,
                    np.array([n + i], np.int32),
                    self._cache,
                    sampling,
                    np.array([i + 1], np.int32),
                )
            yield out.add(int(current[0]))
            if out.finished:
                return

    # -- scoring ------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 logits ``[T, V]`` of one sequence: row t predicts token t + 1."""
        ids = self._prompt_ids(list(token_ids))
        if len(ids) > self.max_seq_len:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_seq_len}")
        bucket = padding.bucket_for(len(ids), self.buckets)
        tokens = padding.pad_to(ids, bucket)[None]
        positions = np.arange(bucket, dtype=np.int32)[None]
        logits, self._cache = self.runner.forward(
            self.runner.params, tokens, positions, self._cache
        )
        return np.asarray(logits[0, : len(ids)], np.float32)


class RequestOutputSink:
    """Receives the RequestOutput a run creates, so callers can read it after streaming."""

    output: RequestOutput


def _is_single(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    items = list(prompts) if not isinstance(prompts, np.ndarray) else prompts.tolist()
    return bool(items) and all(isinstance(t, int | np.integer) for t in items)
