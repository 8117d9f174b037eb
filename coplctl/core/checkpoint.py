"""Training checkpoints as one safetensors file: tensors as tensors, everything else as JSON metadata.

A checkpoint holds nested dicts, lists, tuples, numbers, text and tensors (model, optimizer and
scheduler state dicts, generator states, counters). Nothing is pickled, so a crafted checkpoint in a
shared run directory can at worst be rejected, never execute code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from coplctl.core.atomic import atomic_path
from coplctl.core.errors import DataError

_TAGS = ("$tensor", "$tuple", "$items")


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = _own(obj.detach().cpu().contiguous(), storages)
        return {"$tensor": key}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, storages) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, storages) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors, storages) for k, v in obj.items()}
        return {"$items": [[_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint cannot hold {type(obj).__name__}")


def _own(t: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """``t`` as it is when it owns its whole storage (no copy: a million users' optimiser state would
    double the process's memory), else a copy (safetensors refuses tensors that share memory)."""
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in storages:
        t = t.clone()
    storages.add(t.untyped_storage().data_ptr())
    return t


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and "$tensor" in obj:
            return tensors[obj["$tensor"]]
        if len(obj) == 1 and "$tuple" in obj:
            return tuple(_decode(v, tensors) for v in obj["$tuple"])
        if len(obj) == 1 and "$items" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$items"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_checkpoint(path: str | Path, obj: Any) -> None:
    """Write ``obj`` atomically (a crash leaves the previous checkpoint in place)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(obj, tensors, set()))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"coplctl.core.checkpoint": tree})


def load_checkpoint(path: str | Path) -> Any:
    """Read what :func:`save_checkpoint` wrote; damage of any kind is one DataError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tree = (f.metadata() or {}).get("coplctl.core.checkpoint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise DataError(path, f"is not a readable checkpoint ({str(e).strip()[:200]}); delete it to start over") from None
    if tree is None:
        raise DataError(path, "is not a coplctl checkpoint (no coplctl.core.checkpoint metadata); delete it to start over")
    try:
        return _decode(json.loads(tree), tensors)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise DataError(path, f"holds a damaged checkpoint ({e}); delete it to start over") from None
