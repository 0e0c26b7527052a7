"""Buckets: the one place that decides which padded shapes get compiled.

An engine step's shape is (decode rows, prefill rows): each count is padded up to the next
bucket, powers of two up to the largest count that can occur, so a step computes at most
twice the rows it needs and warm-up compiles a handful of programs.
"""

from __future__ import annotations

import numpy as np


def powers_of_two(largest: int, smallest: int = 1) -> tuple[int, ...]:
    """``smallest, 2 * smallest, ...`` below ``largest``, then ``largest`` itself."""
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


def bucket_for(count: int, buckets: tuple[int, ...]) -> int:
    for bucket in buckets:
        if count <= bucket:
            return bucket
    raise ValueError(f"{count} is more than the largest bucket, {buckets[-1]}")


def pad_to(tokens: list[int], length: int, pad_id: int = 0) -> np.ndarray:
    out = np.full((length,), pad_id, np.int32)
    out[: len(tokens)] = tokens
    return out
