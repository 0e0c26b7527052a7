"""Engine options, checked when the engine is built, and the shapes they imply."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import jax

from jaxllm import kv_cache, padding

if TYPE_CHECKING:
    from jaxllm.runtime import ModelRunner

# Default KV pool where the backend reports no memory figure (CPU): enough for every
# sequence at full length, at most this many bytes.
CPU_DEFAULT_KV_BYTES = 1 << 30
# Where it does (TPU, GPU): this fraction of the memory free after the weights are placed.
ACCELERATOR_KV_FRACTION = 0.8
# Speculative decoding runs while a step has at most this many decode rows: it turns
# memory-bound steps into fewer, wider ones, and a larger batch is compute-bound already
# (each verify shape is also one more program to compile).
SPECULATIVE_MAX_ROWS = 16


def _env_flag() -> bool:
    value = os.environ.get("JAXLLM_BACKGROUND_COMPILE", "1").strip().lower()
    return value not in ("0", "false", "off", "no")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_seq_len: int = 1024  # prompt + output tokens of one request
    max_num_seqs: int = 64  # sequences running at once (decode rows of a step, at most)
    max_step_tokens: int = 256  # tokens one step computes: decodes + prefill chunks
    chunk: int = 32  # prompt tokens one prefill row computes (chunked prefill)
    page_size: int = 16  # tokens per KV page
    attention_block: int = 128  # key positions attention reads per loop iteration
    kv_cache_bytes: int | None = None  # KV pool size; None: see CPU_DEFAULT_KV_BYTES
    kv_cache_dtype: str | None = None  # None: the model's dtype; "int8": quantized pool
    prefix_caching: bool = True
    # Speculative decoding (off by default): "ngram" drafts by prompt lookup, "draft" with
    # the smaller model at ``draft_model`` (same tokenizer); each decode row then verifies up
    # to ``num_speculative_tokens`` drafted tokens in one step (``jaxllm.speculative``).
    speculative: str | None = None
    num_speculative_tokens: int = 4
    draft_model: str | None = None  # a checkpoint path, as ``LLM.load`` takes
    # n-gram drafting: the longest suffix of this many tokens (down to the minimum) that
    # occurred before in the sequence proposes the tokens that followed it. Not 2 tokens:
    # measured on text that does not repeat, 2-token matches are mostly chance and their
    # verifying steps cost more than their kept tokens give (scripts/bench_spec.py).
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 3
    # Serve once the one-row step shapes are compiled and compile the rest while serving,
    # within what is compiled (``jaxllm.staged_warm_up``); False: compile all, then serve.
    # A multi-process engine always compiles all first. Default: $JAXLLM_BACKGROUND_COMPILE
    # (0 turns it off process-wide, servers included), else on.
    background_compile: bool = dataclasses.field(default_factory=_env_flag)

    def __post_init__(self):
        kv_cache.check_dtype(self.kv_cache_dtype)
        limits = {
            "max_seq_len": (2, 1 << 20),
            "max_num_seqs": (1, 4096),
            "max_step_tokens": (1, 1 << 16),
            "chunk": (1, 1 << 14),
            "page_size": (1, 1024),
            "attention_block": (1, 1 << 16),
            "num_speculative_tokens": (1, 16),
            "prompt_lookup_max": (1, 16),
            "prompt_lookup_min": (1, 16),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"engine option {name} must be an integer in [{low}, {high}]")
        if self.attention_block % self.page_size:
            raise ValueError(
                f"attention_block ({self.attention_block}) must be a multiple of page_size "
                f"({self.page_size})"
            )
        if self.speculative not in (None, "ngram", "draft"):
            raise ValueError(
                f"speculative must be None (off), 'ngram' or 'draft', got {self.speculative!r}"
            )
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError(
                "speculative='draft' needs draft_model (a checkpoint path), and only it"
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        if self.kv_cache_bytes is not None and not (
            isinstance(self.kv_cache_bytes, int) and self.kv_cache_bytes > 0
        ):
            raise ValueError("kv_cache_bytes must be a positive integer (or None)")

    @property
    def block_pages(self) -> int:
        return self.attention_block // self.page_size

    @property
    def max_pages_per_seq(self) -> int:
        """Width of a page table: a full-length sequence's pages, in whole attention blocks."""
        pages = -(-self.max_seq_len // self.page_size)
        return -(-pages // self.block_pages) * self.block_pages

    @property
    def max_prefill_rows(self) -> int:
        return max(1, self.max_step_tokens // self.chunk)

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        """Decode rows a step is compiled for: powers of two up to ``max_num_seqs``. A step
        without decodes carries one padding row, which saves a program per prefill shape."""
        return padding.powers_of_two(self.max_num_seqs)

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """Prefill rows a step is compiled for: none, one (a long prompt's chunk while others
        decode: the common case, kept cheap), or all that ``max_step_tokens`` allows (a burst
        of new prompts). Few on purpose: every (decode, prefill) pair is a program."""
        return tuple(sorted({0, 1, self.max_prefill_rows}))

    @property
    def verify_width(self) -> int:
        """Tokens a decode row computes in a step that verifies drafts (1 + k)."""
        return 1 + self.num_speculative_tokens if self.speculative else 1

    @property
    def verify_buckets(self) -> tuple[int, ...]:
        """Decode rows a verifying step is compiled for (none without speculation)."""
        if not self.speculative:
            return ()
        return tuple(d for d in self.decode_buckets if d <= SPECULATIVE_MAX_ROWS)

    @property
    def sampler_rows(self) -> tuple[int, ...]:
        """Row counts the sampler is compiled for: a step's logits rows (decode tokens +
        prefill rows) padded to the first that holds them. Few on purpose: the sampler is slow
        to compile."""
        largest = self.max_num_seqs + self.max_prefill_rows
        verifying = max(self.verify_buckets, default=0) * self.verify_width
        largest = max(largest, verifying + self.max_prefill_rows)
        return tuple(sorted({min(8, largest), largest}))

    @property
    def step_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """Every (decode rows, prefill rows, tokens per decode row) a step can take: what
        warm-up compiles."""
        shapes = [(d, p, 1) for d in self.decode_buckets for p in self.prefill_buckets]
        q = self.verify_width
        return tuple(
            shapes + [(d, p, q) for d in self.verify_buckets for p in self.prefill_buckets]
        )


def pool_pages(runner: ModelRunner, config: EngineConfig, draft: ModelRunner | None = None) -> int:
    """Pages of the KV pool: ``kv_cache_bytes`` if given; else on a one-process mesh whose
    backend reports memory, a fraction of what is free; else (CPU, multi-process) enough for
    ``max_num_seqs`` full-length sequences, at most ``CPU_DEFAULT_KV_BYTES``. With a
    ``draft`` model (speculative decoding), a page also holds its keys and values, and the
    budget covers both pools."""
    per_token = 0
    for model in (runner, draft) if draft is not None else (runner,):
        cfg, dtype = model.config, config.kv_cache_dtype or model.spec.dtype
        per_token += kv_cache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    per_page = per_token * config.page_size
    budget = config.kv_cache_bytes
    mesh = runner.spec.mesh
    if budget is None:
        # Processes of a multi-host mesh must agree on the pool (their steps are one program),
        # and each sees only its own devices' free memory: they use the fixed rule below.
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        single_process = len(local) == mesh.devices.size
        stats = (local[0].memory_stats() or {}) if single_process else {}
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            # The pool's heads are split over the mesh; each device holds its share.
            budget = int(free * ACCELERATOR_KV_FRACTION) * mesh.devices.size
        else:
            need = config.max_num_seqs * config.max_pages_per_seq * per_page
            budget = min(need, CPU_DEFAULT_KV_BYTES)
    pages = budget // per_page
    if pages < config.max_pages_per_seq:
        raise ValueError(
            f"a KV pool of {budget} bytes holds {pages} pages of {config.page_size} tokens "
            f"({per_page} bytes each), fewer than one {config.max_seq_len}-token sequence "
            f"needs ({config.max_pages_per_seq}); raise kv_cache_bytes or lower max_seq_len"
        )
    return int(pages)
