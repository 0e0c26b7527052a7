"""Host bookkeeping of the KV pool's pages: free list, reference counts, prefix cache.

Pure Python (no JAX): ``jaxllm.scheduler`` asks it for pages, and the page ids it hands out
index the device pool (``jaxllm.kv_cache``).

Prefix caching: a full page is identified by a key that hashes its tokens together with the
key of the page before it, so equal keys mean equal token prefixes (BLAKE2b, 128 bits: a
prompt cannot be crafted to collide with another user's and read their cache). A full page
is registered under its key once its keys/values are written; a new sequence walks its
prompt's full pages from the start and takes every registered page until the first miss.
Pages are reference-counted; a registered page nobody holds stays cached (in LRU order) and
is evicted only when the free list is empty.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np


def page_key(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The key of a full page holding ``tokens``, after the page whose key is ``parent``."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(np.asarray(tokens, np.int64).tobytes())
    return digest.digest()


class KVPages:
    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token, got {num_pages=}")
        self.num_pages, self.page_size = num_pages, page_size
        self.prefix_caching = prefix_caching
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        self._refs = [0] * num_pages
        self._page_of: dict[bytes, int] = {}  # registered full pages
        self._key_of: dict[int, bytes] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU

    # -- counts ---------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Pages an allocation can take now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def cached(self) -> int:
        """Registered pages nobody holds (kept for prefix hits, evictable)."""
        return len(self._evictable)

    @property
    def used(self) -> int:
        """Pages held by at least one sequence."""
        return self.num_pages - self.available

    # -- allocation -----------------------------------------------------------------------

    def allocate(self, count: int) -> list[int] | None:
        """``count`` pages, each held once; None (and nothing taken) if there are fewer."""
        if count > self.available:
            return None
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.popleft()
            else:  # evict the least recently released cached page
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drops one hold of each page; a page nobody holds is cached if registered, else
        free. Released in reverse so that a sequence's last pages are evicted first."""
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] < 0:
                raise AssertionError(f"page {page} released more often than held")
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # -- prefix cache ---------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Holds the cached pages of the longest cached prefix of ``tokens``'s full pages,
        never the page of the last token (whose logits must be computed). Returns the pages
        and their keys."""
        pages: list[int] = []
        keys: list[bytes] = []
        usable = (len(tokens) - 1) // self.page_size
        if not self.prefix_caching:
            return pages, keys
        parent = None
        for i in range(usable):
            key = page_key(parent, tokens[i * self.page_size : (i + 1) * self.page_size])
            page = self._page_of.get(key)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
            pages.append(page)
            keys.append(key)
            parent = key
        return pages, keys

    def register(self, page: int, key: bytes) -> None:
        """Makes a full, written page findable by ``key`` (unless another page already is:
        then this one stays private and is freed with its sequence)."""
        if self.prefix_caching and key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key

    def check(self) -> None:
        """Asserts the bookkeeping is consistent (tests; cheap enough for debugging)."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & evictable, "a page is both free and cached"
        for page in range(self.num_pages):
            held = self._refs[page] > 0
            assert held + (page in free) + (page in evictable) == 1, f"page {page} state"
            assert page not in evictable or page in self._key_of
        assert all(self._page_of[k] == p for p, k in self._key_of.items())
