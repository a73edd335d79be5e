"""Content-addressed committed pages, shared engine-wide.

A committed page's key is `hash(parent key, tokens, positions)`: the chain
makes the key name the whole prefix up to and including the page, so a flat
map from key to page *is* a trie over page-sized token blocks (a child can only
be reached through its parent's key). Two contexts that commit the same prefix
end up on the same physical pages, each holding a reference.

Once registered a page is immutable: writers copy it first (copy-on-write).
When its last reference goes, the pool keeps it as *cached*; the pool evicts
cached pages LRU when it needs room and tells the trie to forget them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NamedTuple

from pie.runtime.pages import PagePool

PageKey = bytes
ROOT_KEY: PageKey = b""


def page_key(parent: PageKey, tokens: Sequence[int], positions: Sequence[int], extra: bytes = b"") -> PageKey:
    """The content key of one full page: what its KV is a function of (under causal attention).

    `extra`: more of what it depends on, the images placed in it (`pie.runtime.images.page_extra`)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    h.update(array("q", positions).tobytes())
    if extra:
        h.update(extra)
    return h.digest()


class InsertResult(NamedTuple):
    page: int  # the canonical page for the key: the caller's, or the one already registered
    existed: bool


class PrefixTrie:
    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._page_of: dict[PageKey, int] = {}
        self._key_of: dict[int, PageKey] = {}
        pool.set_hooks(on_evict=self._forget)

    def __len__(self) -> int:
        return len(self._page_of)

    def lookup(self, key: PageKey) -> int | None:
        return self._page_of.get(key)

    def holds(self, page: int) -> bool:
        return page in self._key_of

    def insert(self, key: PageKey, page: int) -> InsertResult:
        """Register `page` (referenced by the caller) under `key`, unless the key already has a page.

        When it exists the caller should switch to the returned page (and drop
        its own): that is the dedup that makes identical prefixes share memory."""
        existing = self._page_of.get(key)
        if existing is not None:
            return InsertResult(existing, True)
        assert page not in self._key_of, f"page {page} is already registered under another key"
        self._page_of[key] = page
        self._key_of[page] = key
        self.pool.retain(page)
        return InsertResult(page, False)

    def _forget(self, page: int) -> None:
        key = self._key_of.pop(page)
        del self._page_of[key]

    def check_integrity(self) -> None:
        assert len(self._page_of) == len(self._key_of)
        for key, page in self._page_of.items():
            assert self._key_of[page] == key, f"page {page} maps back to a different key"
            assert self.pool.is_retained(page), f"trie page {page} is not retained by the pool"
