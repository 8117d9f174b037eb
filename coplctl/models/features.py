"""Frozen-mode features: each unique formatted text is embedded once per backbone and kept on disk.

The cache lives in ``$COPLCTL_CACHE/features/<backbone key>/`` as append-only safetensors shards, each
holding the SHA-1 digests of its texts and their pooled features. Any method and any run with the
same backbone (name, architecture, max length, pooling) reuses them; a new dataset only embeds the
texts not seen before. Shards are written atomically, so an interrupted run loses only the shard
in progress. A process keeps each cache's index open and reads only shards added since its last call.

Inside :func:`in_memory` (the Python API's scoring), texts the disk cache lacks are embedded into a
bounded in-memory store instead (least recently used first out), so scoring in a loop never writes.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coplctl.core.atomic import atomic_path
from coplctl.models.backbone import Backbone, cache_root

SHARD_TEXTS = 4096  # texts per shard written (and per progress step)


def text_digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


class FeatureCache:
    """Digest → feature row store for one backbone key."""

    def __init__(self, key: str, root: Path | None = None):
        self.dir = (root or cache_root() / "features") / key
        self.index: dict[bytes, tuple[int, int]] = {}
        self.shards: list[Path] = []
        self._loaded: dict[int, torch.Tensor] = {}
        self.refresh()

    def refresh(self) -> None:
        """Index the shards written since the last look (by this or another process)."""
        if not self.dir.exists():
            return
        known = set(self.shards)
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            if path in known:
                continue
            digests = load_file(str(path))["digests"]
            k = len(self.shards)
            self.shards.append(path)
            for row, d in enumerate(digests.numpy()):
                self.index.setdefault(d.tobytes(), (k, row))

    def _shard(self, k: int) -> torch.Tensor:
        if k not in self._loaded:
            self._loaded[k] = load_file(str(self.shards[k]))["features"]
        return self._loaded[k]

    def add(self, digests: list[bytes], features: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        k = len(self.shards)
        path = self.dir / f"shard-{time.time_ns():020d}.safetensors"
        d = torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).reshape(len(digests), 20)
        with atomic_path(path) as tmp:
            save_file({"digests": d, "features": features.contiguous()}, str(tmp))
        self.shards.append(path)
        self._loaded[k] = features
        for row, dg in enumerate(digests):
            self.index.setdefault(dg, (k, row))

    def lookup(self, digests: list[bytes]) -> torch.Tensor:
        loc = torch.tensor([self.index[d] for d in digests], dtype=torch.long).reshape(-1, 2)
        if len(loc) == 0:
            return torch.empty(0, 0)
        out = torch.empty(len(loc), self._shard(int(loc[0, 0])).shape[1])
        for k in loc[:, 0].unique().tolist():
            m = loc[:, 0] == k
            out[m] = self._shard(k)[loc[m, 1]]
        return out


class MemoryStore:
    """Features of texts the disk cache lacks, kept in memory: at most ``limit`` texts, least recently
    used first out."""

    def __init__(self, limit: int = 50_000):
        self.limit, self.rows = limit, OrderedDict()

    def __contains__(self, d: bytes) -> bool:
        return d in self.rows

    def get(self, d: bytes) -> torch.Tensor:
        self.rows.move_to_end(d)
        return self.rows[d]

    def put(self, digests: list[bytes], feats: torch.Tensor) -> None:
        for d, row in zip(digests, feats):
            self.rows[d] = row.clone()
            self.rows.move_to_end(d)
        while len(self.rows) > self.limit:
            self.rows.popitem(last=False)


_MEMORY: ContextVar[MemoryStore | None] = ContextVar("coplctl_feature_memory", default=None)
_OPEN: dict[Path, FeatureCache] = {}


@contextmanager
def in_memory(store: MemoryStore) -> Iterator[MemoryStore]:
    """Within this block, texts the disk cache lacks go to ``store``, never to new shards."""
    token = _MEMORY.set(store)
    try:
        yield store
    finally:
        _MEMORY.reset(token)


def open_cache(key: str, root: Path | None = None) -> FeatureCache:
    """The process's open cache for ``key`` (its index read once, refreshed with new shards)."""
    path = (root or cache_root() / "features") / key
    cache = _OPEN.get(path)
    if cache is None:
        cache = _OPEN[path] = FeatureCache(key, root)
    else:
        cache.refresh()
    return cache


def features(backbone: Backbone, texts: list[str], *, batch_size: int = 32, progress=None,
             root: Path | None = None) -> torch.Tensor:
    """Pooled frozen-backbone features of formatted texts, computing only those not cached yet.

    ``progress(done, total)`` is called as texts are embedded.
    """
    cache = open_cache(backbone.key, root)
    memory = _MEMORY.get()
    digests = [text_digest(t) for t in texts]
    missing, seen = [], set()
    for t, d in zip(texts, digests):
        if d not in cache.index and d not in seen and (memory is None or d not in memory):
            seen.add(d)
            missing.append((t, d))
    new: dict[bytes, torch.Tensor] = {}  # this call's texts held in memory (the store may evict them)
    for s in range(0, len(missing), SHARD_TEXTS):
        chunk = missing[s:s + SHARD_TEXTS]
        feats = backbone.embed([t for t, _ in chunk], batch_size=batch_size)
        if memory is None:
            cache.add([d for _, d in chunk], feats)
        else:
            memory.put([d for _, d in chunk], feats)
            new.update(zip((d for _, d in chunk), feats))
        if progress is not None:
            progress(min(s + SHARD_TEXTS, len(missing)), len(missing))
    if memory is None or all(d in cache.index for d in digests):
        return cache.lookup(digests)
    on_disk = [d in cache.index for d in digests]
    rows = iter(cache.lookup([d for d, ok in zip(digests, on_disk) if ok]))
    return torch.stack([next(rows) if ok else new[d] if d in new else memory.get(d)
                        for d, ok in zip(digests, on_disk)])
