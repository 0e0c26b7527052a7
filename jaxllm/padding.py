"""Prompt length buckets: the one place that decides which padded shapes get compiled."""

from __future__ import annotations

import numpy as np

MIN_BUCKET = 16


def prefill_buckets(max_prompt_len: int, min_bucket: int = MIN_BUCKET) -> tuple[int, ...]:
    """Powers of two from ``min_bucket`` up to and including ``max_prompt_len``."""
    buckets, size = [], min_bucket
    while size < max_prompt_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_prompt_len)


def prefill_rows(bucket: int, max_rows: int, token_budget: int) -> int:
    """Prompts of one bucket prefilled together in one call: as many as fit ``token_budget``
    padded tokens, at most ``max_rows``, at least one. Batching short prompts turns many thin
    matmuls (``[bucket, D]``, slow on CPU and poorly filled on accelerators) into few wide ones."""
    return max(1, min(max_rows, token_budget // bucket))


def attend_lengths(max_seq_len: int, min_len: int) -> tuple[int, ...]:
    """Cache prefixes a decode step may attend over: powers of two from ``min_len`` up to and
    including ``max_seq_len``. A step reads the shortest one that covers every running
    request, so short requests do not pay for reading a long context's empty positions."""
    return prefill_buckets(max_seq_len, min(min_len, max_seq_len))


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"prompt of {length} tokens is longer than the maximum of {buckets[-1]}")


def pad_to(tokens: list[int], length: int, pad_id: int = 0) -> np.ndarray:
    out = np.full((length,), pad_id, np.int32)
    out[: len(tokens)] = tokens
    return out
