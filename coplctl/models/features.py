"""Frozen-mode features: each unique formatted text is embedded once per backbone and kept on disk.

The cache lives in ``$COPLCTL_CACHE/features/<backbone key>/`` as append-only safetensors shards, each
holding the SHA-1 digests of its texts, their pooled features and how each text was cut to the length
limit (:mod:`coplctl.models.tokens`). Any method and any run with the same backbone key (name,
architecture, length limit, pooling, precision) reuses them; a new dataset only embeds the
texts not seen before. Shards are written atomically, so an interrupted run loses only the shard
in progress. A process keeps each cache's index open and reads only shards added since its last call.

Inside :func:`shared_by_processes`, entered by every process of an initialised torch.distributed group
(``accelerate launch``) at the same point, each process embeds its share of the missing texts (chunks
dealt round-robin) into the shared cache directory, then all wait for each other and read the others'
shards: on several machines the cache directory (``$COPLCTL_CACHE``) must be shared storage.

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

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from coplctl.core.atomic import atomic_path
from coplctl.models.backbone import Backbone, cache_root
from coplctl.models.tokens import cut_counts

SHARD_TEXTS = 4096  # texts per shard written


def text_digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


class FeatureCache:
    """Digest → feature row store for one backbone key."""

    def __init__(self, key: str, root: Path | None = None):
        self.dir = (root or cache_root() / "features") / key
        self.index: dict[bytes, tuple[int, int]] = {}
        self.shards: list[Path] = []
        self._loaded: dict[int, torch.Tensor] = {}
        self._cuts: dict[int, torch.Tensor] = {}
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

    def add(self, digests: list[bytes], features: torch.Tensor, cuts: np.ndarray, tag: str = "") -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        k = len(self.shards)
        path = self.dir / f"shard-{time.time_ns():020d}{tag}.safetensors"
        d = torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).reshape(len(digests), 20)
        with atomic_path(path) as tmp:
            save_file({"digests": d, "features": features.contiguous(), "cuts": torch.from_numpy(cuts)}, str(tmp))
        self.shards.append(path)
        self._loaded[k] = features
        self._cuts[k] = torch.from_numpy(cuts)
        for row, dg in enumerate(digests):
            self.index.setdefault(dg, (k, row))

    def _locate(self, digests: list[bytes]) -> torch.Tensor:
        return torch.tensor([self.index[d] for d in digests], dtype=torch.long).reshape(-1, 2)

    def lookup(self, digests: list[bytes]) -> torch.Tensor:
        loc = self._locate(digests)
        if len(loc) == 0:
            return torch.empty(0, 0)
        out = torch.empty(len(loc), self._shard(int(loc[0, 0])).shape[1])
        for k in loc[:, 0].unique().tolist():
            m = loc[:, 0] == k
            out[m] = self._shard(k)[loc[m, 1]]
        return out

    def cut_codes(self, digests: list[bytes]) -> np.ndarray:
        """How each text was cut (:mod:`coplctl.models.tokens` codes)."""
        loc = self._locate(digests)
        out = torch.zeros(len(loc), dtype=torch.uint8)
        for k in loc[:, 0].unique().tolist():
            if k not in self._cuts:
                self._cuts[k] = load_file(str(self.shards[k]))["cuts"]
            m = loc[:, 0] == k
            out[m] = self._cuts[k][loc[m, 1]]
        return out.numpy()


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
_SHARED: ContextVar[bool] = ContextVar("coplctl_features_shared", default=False)
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


@contextmanager
def shared_by_processes() -> Iterator[None]:
    """Within this block, :func:`features` splits the missing texts among the processes of the initialised
    torch.distributed group; every process must make the same calls (same texts, same order)."""
    token = _SHARED.set(True)
    try:
        yield
    finally:
        _SHARED.reset(token)


def _processes() -> tuple[int, int]:
    """(this process's rank, processes) sharing :func:`features` calls, else (0, 1)."""
    if _SHARED.get() and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _fill(backbone: Backbone, prompts: list[str], responses: list[str], batch_size: int, progress,
          root: Path | None) -> tuple[list[bytes], dict[bytes, torch.Tensor], FeatureCache, int]:
    """Embed the texts neither the cache nor the memory store holds (this process's share of them, inside
    :func:`shared_by_processes`); returns (each text's digest, this call's texts kept in memory, the cache, how
    many distinct texts were missing)."""
    cache = open_cache(backbone.key, root)
    memory = _MEMORY.get()
    digests = [text_digest(backbone.format(p, r)) for p, r in zip(prompts, responses)]
    missing, seen = [], set()
    for i, d in enumerate(digests):
        if d not in cache.index and d not in seen and (memory is None or d not in memory):
            seen.add(d)
            missing.append(i)
    rank, world = _processes() if memory is None else (0, 1)
    if world > 1:  # every process has listed the same missing texts before any of them writes a shard
        torch.distributed.barrier()
    size = min(SHARD_TEXTS, max(1, -(-len(missing) // world)))  # every process gets a share of few texts too
    chunks = [missing[s:s + size] for s in range(0, len(missing), size)][rank::world]
    mine = sum(len(c) for c in chunks)
    new: dict[bytes, torch.Tensor] = {}  # this call's texts held in memory (the store may evict them)
    done = 0
    for chunk in chunks:
        step = None if progress is None else (lambda k, base=done: progress(base + k, mine))  # noqa: E731
        feats, codes = backbone.embed([prompts[i] for i in chunk], [responses[i] for i in chunk], batch_size, step)
        chunk_digests = [digests[i] for i in chunk]
        if memory is None:
            cache.add(chunk_digests, feats, codes, tag=f"-{rank}" if world > 1 else "")
        else:
            memory.put(chunk_digests, feats)
            new.update(zip(chunk_digests, feats))
        done += len(chunk)
    if world > 1:
        torch.distributed.barrier()  # every process's shards are written
        cache.refresh()
    return digests, new, cache, len(missing)


def features(backbone: Backbone, prompts, responses, *, batch_size: int = 32, progress=None,
             root: Path | None = None, cuts: dict | None = None) -> torch.Tensor:
    """Pooled frozen-backbone features of the formatted texts of ``prompts`` and ``responses`` (parallel
    sequences), computing only those not cached yet (shared across processes, see the module's docstring).

    ``progress(done, total)`` is called after each batch this process embeds; ``cuts``, if given, receives the
    counts of texts whose prompt or response was cut (:func:`coplctl.models.tokens.cut_counts`).
    """
    memory = _MEMORY.get()
    digests, new, cache, _ = _fill(backbone, list(prompts), list(responses), batch_size, progress, root)
    if cuts is not None and memory is None:
        cuts.update(cut_counts(cache.cut_codes(digests)))
    if memory is None or all(d in cache.index for d in digests):
        return cache.lookup(digests)
    on_disk = [d in cache.index for d in digests]
    rows = iter(cache.lookup([d for d, ok in zip(digests, on_disk) if ok]))
    return torch.stack([next(rows) if ok else new[d] if d in new else memory.get(d)
                        for d, ok in zip(digests, on_disk)])


def embed_all(backbone: Backbone, prompts, responses, *, batch_size: int = 32, progress=None) -> dict:
    """Fill the cache with the features of every text (shared by the processes of an initialised
    torch.distributed group, which must all call this), without reading them back; what was done, as plain
    JSON-able values."""
    t0 = time.perf_counter()
    with shared_by_processes():
        digests, _, cache, new = _fill(backbone, list(prompts), list(responses), batch_size, progress, None)
        processes = _processes()[1]
    seconds = time.perf_counter() - t0
    return {"backbone": backbone.key, "cache": str(cache.dir), "texts": len(set(digests)), "embedded": new,
            "seconds": round(seconds, 2), "texts_per_second": round(new / seconds, 1) if new else None,
            "processes": processes, "truncated": cut_counts(cache.cut_codes(digests))}
