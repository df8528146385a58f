"""Walking the nested containers a batch or an op's output comes in (tuples, lists, dicts, Mappings)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["tensors", "map_tensors"]


def _is_mapping(obj: Any) -> bool:
    # dict, and Mapping-likes such as transformers' BatchEncoding (a UserDict).
    return isinstance(obj, dict) or (hasattr(obj, "items") and hasattr(obj, "keys"))


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in any nesting of tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors(item)
    elif _is_mapping(obj):
        for item in obj.values():
            yield from tensors(item)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by ``fn(tensor)``; containers keep their types."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return type(obj)({k: map_tensors(v, fn) for k, v in obj.items()})
    if _is_mapping(obj):  # e.g. BatchEncoding: a shallow copy keeps its type and attribute access
        out = copy.copy(obj)
        for k in list(out.keys()):
            out[k] = map_tensors(obj[k], fn)
        return out
    return obj
