"""SourceLines: the line of the model's own code that ran each allocating op, for explanations.

A tensor's creating op and module say what it is (``aten.mm`` in ``mlp.c_fc``); the Python line
says where to look. For each op that allocates in the forward, the innermost frame of the calling
stack that is not torch's, memfit's machinery or Python's standard library is the model's line
(``modeling_llama.py:233 in forward``; a memfit preset's own loss counts as the model's code).

Lines are kept per (module, op) rather than per storage: a later step replays the first's records
and a deep model's trace is extrapolated from cut ones (:mod:`memfit.replay`,
:mod:`memfit.extrapolation`), and both keep modules and ops while renumbering storages.
Backward and optimizer ops have no line of the model's own (autograd's engine and
``torch.optim`` run them): none is recorded.

Known limitations: a line is the innermost of the model's frames; an op run by a helper in the
model's package (a decorator's wrapper) names the helper's line.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from typing import Any

import torch

__all__ = ["SourceLines", "lookup", "blockless"]

_MEMFIT = os.path.dirname(os.path.abspath(__file__))
_LIBRARIES = tuple(os.path.join(p, "") for p in (
    os.path.dirname(os.path.abspath(torch.__file__)), _MEMFIT, sysconfig.get_paths()["stdlib"]))
_MODEL_CODE = (os.path.join(_MEMFIT, "presets.py"),)  # memfit's presets are models, not machinery


class SourceLines:
    """``(module index, op) -> {"file:line in function"}`` for the forward ops observed (see the module docstring)."""

    def __init__(self) -> None:
        self.lines: dict[tuple[int, Any], set[str]] = {}
        self._library: dict[Any, bool] = {}  # code object -> is it machinery
        self._names: dict[Any, str] = {}  # code object -> its file as the user reads it

    def note(self, module: int, func: Any) -> None:
        """Record the model's line now running ``func`` in ``module`` (call from inside the op's dispatch)."""
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            library = self._library.get(code)
            if library is None:
                path = os.path.abspath(code.co_filename)
                library = self._library[code] = (code.co_filename.startswith("<")
                                                 or (path.startswith(_LIBRARIES) and path not in _MODEL_CODE))
            if not library:
                name = self._names.get(code)
                if name is None:
                    name = self._names[code] = _short(code.co_filename)
                where = f"{name}:{frame.f_lineno} in {code.co_name}"
                self.lines.setdefault((module, func), set()).add(where)
                return
            frame = frame.f_back

    def by_path(self, paths: list[str]) -> dict[tuple[str | None, str], tuple[str, ...]]:
        """The lines keyed by (module path, op name), as a :class:`memfit.report.History` keeps them."""
        return {(paths[m] if m >= 0 else None, str(func)): tuple(sorted(lines))
                for (m, func), lines in self.lines.items()}


def lookup(sources: dict[tuple[str | None, str], tuple[str, ...]], module: str | None, op: str) -> tuple[str, ...]:
    """The lines of ``op`` in ``module``; for a block the trace did not run (a deep model's trace is extrapolated
    from a cut of it), those of the same op in the blocks it did run (their code is the same)."""
    exact = sources.get((module, op))
    if exact is not None or module is None:
        return exact or ()
    pattern = blockless(module)
    found = sorted({line for (m, o), lines in sources.items() if o == op and m is not None
                    and blockless(m) == pattern for line in lines})
    return tuple(found)


def _short(filename: str) -> str:
    """``filename`` relative to the import root it is under (``transformers/models/...``), else to the working
    folder where it is inside it, else as it is."""
    path = os.path.abspath(filename)
    roots = [os.path.join(os.path.abspath(p), "") for p in sys.path if p] + [os.path.join(os.getcwd(), "")]
    inside = [root for root in roots if path.startswith(root)]
    return path[len(max(inside, key=len)):] if inside else filename


def blockless(path: str | None) -> tuple[str, ...] | None:
    """A module path with its numbered parts (a block's index in its list) made alike; None stays None."""
    return None if path is None else tuple("#" if part.isdigit() else part for part in path.split("."))
