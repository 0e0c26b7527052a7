"""The notebook API: ``LLM.load`` a model, then ``generate``, ``chat``, ``stream``, ``logits``.

Every generation goes through the continuous-batching engine (``jaxllm.engine``), the same
one the server uses; ``logits`` runs a plain forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxllm import demo, orbax_checkpoint, padding, startup
from jaxllm.chat import chat_prompt_ids
from jaxllm.config import ModelConfig
from jaxllm.engine import Engine
from jaxllm.engine_config import EngineConfig
from jaxllm.gguf_checkpoint import GGUFFile, is_gguf_file, load_gguf_state
from jaxllm.hf_checkpoint import load_hf_state
from jaxllm.params import ModelSpec
from jaxllm.request_output import RequestOutput, TokenLogprob
from jaxllm.runtime import ModelRunner
from jaxllm.sampling import SamplingParams
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
    # With logprobs=k: one per token id, in the distribution it was sampled from.
    logprobs: list[TokenLogprob] | None = None
    # With prompt_logprobs=k: one per prompt id (the first is None), the model's own.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @classmethod
    def of(cls, output: RequestOutput, prompt_ids: list[int]) -> Completion:
        params = output.params
        return cls(
            output.text,
            output.token_ids,
            output.finish_reason,
            prompt_ids,
            logprobs=list(output.logprobs) if params.logprobs is not None else None,
            prompt_logprobs=(
                list(output.prompt_logprobs) if params.prompt_logprobs is not None else None
            ),
        )


def default_dtype():
    # XLA's CPU backend runs bfloat16 matmuls ~25x slower than float32 (measured here).
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


class LLM:
    def __init__(self, engine: Engine, name: str):
        self.engine = engine
        self.runner = engine.runner
        self.tokenizer = engine.tokenizer
        self.name = name

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        mesh: Mesh | dict[str, int] | str | None = None,
        dtype=None,
        rules: ShardingRules | str | None = None,
        quantize: str | None = None,
        warm_up: bool = True,
        start: bool = True,
        warm_up_prompt_logprobs: bool = False,
        compilation_cache: str | Path | bool = True,
        scan_layers: bool | None = None,
        **engine_options,
    ) -> LLM:
        """Loads a model sharded over ``mesh`` by ``rules`` and starts its engine.

        ``path`` is a Hugging Face folder (config.json + *.safetensors + tokenizer), a jaxllm
        Orbax checkpoint (``jaxllm convert``), a GGUF file (llama.cpp's format: config,
        tokenizer and weights in one file, dequantized as read; ``jaxllm.gguf_checkpoint``),
        or ``None`` for the bundled demo model
        (``jaxllm.demo``: a small Python-code model trained by ``scripts/train_demo.py``).
        ``mesh`` None means every local device on ``tensor``, except on CPU, where it means
        one device (fake host devices share the same cores, so splitting only adds work).
        ``engine_options`` are ``jaxllm.EngineConfig`` fields (``max_seq_len``,
        ``max_num_seqs``, ``max_step_tokens``, ``kv_cache_bytes``, ``kv_cache_dtype``,
        ...); every step shape is compiled before this returns unless ``warm_up=False``.
        With ``start=False`` the engine's threads do not run: a multi-host follower
        (``jaxllm.lockstep``) replays the leader's steps.

        ``quantize="int8"`` stores every weight in int8 with per-output-channel scales,
        ``"int4"`` the layers' weights in int4 with a scale per 32 inputs (``-g64``,
        ``-g128``: wider groups; ``jaxllm.quantize``), quantizing a float checkpoint one
        weight at a time as it is read (a GGUF file's Q4_0/Q8_0 blocks are kept as they are
        for ``int4``/``int8-g32``); a checkpoint saved quantized (``jaxllm convert
        --quantize``) loads quantized whatever this says.

        ``warm_up_prompt_logprobs=True`` also compiles the prompt-scoring pass for every
        prompt-length bucket at warm-up (``jaxllm.scoring``), so ``prompt_logprobs``
        requests never compile while serving; otherwise the first one of each bucket does.

        ``compilation_cache``: where compiled programs are kept across processes, so a second
        start of the same model and options compiles nothing (``jaxllm.startup``): ``True``
        (default) a per-user folder (``~/.cache/jaxllm/xla``, or the folder JAX is already
        configured with), a path, or ``False`` for none. Start-up times are logged and kept
        in ``llm.engine.stats()["startup"]``.

        ``scan_layers``: run the decoder layers with ``jax.lax.scan`` over stacked weights,
        so compile time does not grow with depth; None (default) scans except on a CPU mesh
        of several devices, where XLA copies each layer's weights out of the stack before its
        matmuls (``jaxllm.model``, ``jaxllm.params.default_scan_layers``). Logits are the
        same either way, to float rounding."""
        cache_dir = startup.use_compilation_cache(compilation_cache)
        report = startup.StartupReport(cache_dir=str(cache_dir) if cache_dir else None)
        if mesh is None and jax.default_backend() == "cpu":
            mesh = make_mesh({"tensor": 1}, devices=jax.local_devices()[:1])
        mesh = make_mesh(mesh)
        dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
        name = demo.DEMO_MODEL_NAME if path is None else Path(path).name
        checkpoint = _Checkpoint.open(path)
        config, tokenizer = checkpoint.config, checkpoint.tokenizer
        quantize = checkpoint.stored_quantized or quantize
        spec = ModelSpec(
            config, dtype, mesh, get_rules(rules), quantized=quantize, scan_layers=scan_layers
        )
        runner = checkpoint.load(spec, name, report)
        engine_options.setdefault("max_seq_len", min(2048, config.max_position_embeddings))
        unknown = set(engine_options) - {f.name for f in dataclasses.fields(EngineConfig)}
        if unknown:
            raise ValueError(
                f"unknown engine options {sorted(unknown)}; the options are "
                f"{[f.name for f in dataclasses.fields(EngineConfig)]}"
            )
        engine_config = EngineConfig(**engine_options)
        if engine_config.max_seq_len > config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {engine_config.max_seq_len} exceeds the model's "
                f"max_position_embeddings ({config.max_position_embeddings})"
            )
        draft = None
        if engine_config.draft_model is not None:  # on the same mesh, in the same format
            draft_checkpoint = _Checkpoint.open(engine_config.draft_model)
            draft_checkpoint.check_drafts_for(tokenizer, config)
            draft_spec = ModelSpec(
                draft_checkpoint.config,
                dtype,
                mesh,
                get_rules(rules),
                quantized=draft_checkpoint.stored_quantized or quantize,
                scan_layers=scan_layers,
            )
            draft = draft_checkpoint.load(draft_spec, "draft model", report)
        engine = Engine(
            runner,
            tokenizer,
            engine_config,
            warm_up_prompt_logprobs=warm_up_prompt_logprobs,
            startup=report,
            draft=draft,
        )
        if start:
            engine.start(warm_up=warm_up)
        elif warm_up:
            engine.warm_up()
        return cls(engine, name)

    def close(self) -> None:
        """Stops the engine's threads (``Engine.start`` also has them stopped at interpreter
        exit, after the current step)."""
        self.engine.stop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def max_seq_len(self) -> int:
        return self.engine.config.max_seq_len

    @property
    def config(self) -> ModelConfig:
        return self.runner.config

    @property
    def mesh(self) -> Mesh:
        return self.runner.spec.mesh

    # -- generation ---------------------------------------------------------------------

    def generate(
        self, prompts: Prompt | Sequence[Prompt], *, n: int = 1, **sampling
    ) -> Completion | list[Completion] | list[list[Completion]]:
        """Completes one prompt (text or token ids) or a list of them. A list goes through
        the continuous-batching engine together; every prompt is checked before any runs.

        Keyword arguments are ``SamplingParams`` fields: ``max_tokens``, ``temperature``
        (0 = greedy), ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``stop_token_ids``,
        ``ignore_eos``, ``logprobs`` and ``prompt_logprobs`` (k in 0..20: fill
        ``Completion.logprobs`` / ``.prompt_logprobs`` with each token's logprob and the k
        most likely alternatives).

        ``n > 1`` samples n completions of each prompt, sharing its computation (and with a
        ``seed``, choice i uses ``seed + i``): a list of n completions for one prompt, a list
        of such lists for a list of prompts.
        """
        params = SamplingParams(**sampling)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        single = _is_single(prompts)
        all_ids = [self._prompt_ids(p) for p in ([prompts] if single else prompts)]
        for ids in all_ids:
            self.engine.check(ids, params)
        groups = []
        try:
            for ids in all_ids:
                groups.append(
                    self.engine.submit_many(ids, params, n)
                    if n > 1
                    else [self.engine.submit(ids, params)]
                )
            outs = [[r.wait() for r in group] for group in groups]
        finally:
            for group in groups:
                for r in group:
                    r.cancel()  # no-op for finished ones; frees slots on KeyboardInterrupt
        done = [
            [Completion.of(o, ids) for o in group] for group, ids in zip(outs, all_ids, strict=True)
        ]
        if n == 1:
            done = [group[0] for group in done]
        return done[0] if single else done

    def chat(
        self, messages: Sequence, *, n: int = 1, **sampling
    ) -> Completion | list[Completion] | list[list[Completion]]:
        """The assistant's reply to one conversation (a list of ``{"role": "system" |
        "user" | "assistant", "content": str}``) or to each of a list of them, rendered with
        the model's chat template (``jaxllm.chat.chat_prompt_ids``, as the servers do).
        Returns what ``generate`` returns for the rendered prompts; same keywords."""
        if isinstance(messages, str | Mapping):
            raise ValueError("messages must be a list of {'role', 'content'} objects")
        single = not messages or isinstance(messages[0], Mapping)
        conversations = [messages] if single else list(messages)
        all_ids = [chat_prompt_ids(self.tokenizer, c) for c in conversations]
        return self.generate(all_ids[0] if single else all_ids, n=n, **sampling)

    def stream(self, prompt: Prompt, **sampling) -> Iterator[str]:
        """Yields text pieces as they are decoded (never half a UTF-8 character). Closing
        the iterator early cancels the request and frees its slot."""
        request = self.engine.submit(self._prompt_ids(prompt), SamplingParams(**sampling))
        try:
            yield from request
        finally:
            request.cancel()

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

    # -- scoring ------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 logits ``[T, V]`` of one sequence: row t predicts token t + 1. Keys and
        values are rounded as the engine's ``kv_cache_dtype`` stores them, so an int8
        pool's rounding shows in the scores as it does in generation."""
        ids = self._prompt_ids(list(token_ids))
        if len(ids) > self.max_seq_len:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_seq_len}")
        bucket = padding.bucket_for(len(ids), padding.powers_of_two(self.max_seq_len, 16))
        tokens = padding.pad_to(ids, bucket)[None]
        positions = np.arange(bucket, dtype=np.int32)[None]
        logits = self.runner.forward(
            self.runner.params, tokens, positions, kv_dtype=self.engine.config.kv_cache_dtype
        )
        return np.asarray(logits[0, : len(ids)], np.float32)


def _is_single(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    items = list(prompts) if not isinstance(prompts, np.ndarray) else prompts.tolist()
    return bool(items) and all(isinstance(t, int | np.integer) for t in items)


@dataclasses.dataclass
class _Checkpoint:
    """A model on disk, opened: its config and tokenizer, and how to read its weights."""

    config: ModelConfig
    tokenizer: Tokenizer
    loader: Callable  # (spec, progress) -> (graphdef, state)
    stored_quantized: str | None  # saved quantized ("int8"): it loads so, whatever is asked

    @classmethod
    def open(cls, path: str | Path | None) -> _Checkpoint:
        """A Hugging Face folder, a jaxllm Orbax checkpoint, a GGUF file, or None (demo)."""
        path = demo.demo_model_dir() if path is None else Path(path)
        if is_gguf_file(path):  # by its magic bytes, whatever the suffix
            gguf_file = GGUFFile(path)
            loader = functools.partial(load_gguf_state, gguf_file)
            return cls(gguf_file.config(), gguf_file.tokenizer(), loader, None)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder or GGUF file {path} does not exist")
        if orbax_checkpoint.is_orbax_checkpoint(path):
            return cls(
                orbax_checkpoint.read_config(path),
                Tokenizer.from_dir(orbax_checkpoint.tokenizer_dir(path)),
                functools.partial(orbax_checkpoint.load_orbax_state, path),
                orbax_checkpoint.read_quantization(path),
            )
        loader = functools.partial(load_hf_state, path)
        return cls(ModelConfig.from_hf_dir(path), Tokenizer.from_dir(path), loader, None)

    def load(self, spec: ModelSpec, name: str, report: startup.StartupReport) -> ModelRunner:
        # Bytes as read: a float checkpoint quantized at load is read in float.
        itemsize = 1 if self.stored_quantized else jnp.dtype(spec.dtype).itemsize
        total = self.config.num_params * itemsize
        report.weight_bytes += total
        began = time.perf_counter()
        with (
            tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {name}") as bar,
            startup.recording(report),
        ):
            graphdef, state = self.loader(spec, lambda _, n: bar.update(n))
        report.weights_done(time.perf_counter() - began)
        return ModelRunner(spec, graphdef, state)

    def check_drafts_for(self, tokenizer: Tokenizer, config: ModelConfig) -> None:
        """A draft model must speak the target's tokens: the same tokenizer vocabulary, and
        no token id the target does not have."""
        probe = "def main():\n    return {'a': [1, 2.5]}  # ok"
        same = self.tokenizer.vocab_size == tokenizer.vocab_size and self.tokenizer.encode(
            probe
        ) == tokenizer.encode(probe)
        if not same or self.config.vocab_size > config.vocab_size:
            raise ValueError(
                "the draft model's tokenizer differs from the model's "
                f"(vocab {self.tokenizer.vocab_size} / {self.config.vocab_size} ids against "
                f"{tokenizer.vocab_size} / {config.vocab_size}): a draft model must share "
                "the model's tokenizer"
            )
