"""Extrapolation of a step's history by depth: tokens that name neither blocks nor storages, and their diff.

The trace of a model cut to n identical blocks is, once block indices and storage
serials are taken out, the trace cut to fewer blocks with copies of one block's
records inserted at fixed places (its forward, its backward, its parameters'
gradients and optimizer state, in every step). :func:`encode` writes a
:class:`memfit.report.History` as such tokens: a module is its path inside its
block plus the step from the previous block's (+1 going forward, -1 in
backward), a storage freed is the k-th newest (or oldest) live storage of its
kind (category, allocating module, size). :func:`extrapolate` diffs two cuts'
tokens (Python's ``difflib``, by op first, then within the ops that changed),
checks the prediction for a third cut token for token, expands the inserted
tokens to the full depth and decodes them into a history with the full model's
module paths. :mod:`memfit.depth` finds the runs and cuts the models.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from memfit.report import History

__all__ = ["Run", "encode", "extrapolate", "with_peak", "canonical"]


@dataclass(frozen=True, slots=True)
class Run:
    """A run of identical blocks that ends a container: children ``start`` to ``start + count - 1``."""

    container: str
    """Path of the ``nn.ModuleList`` or ``nn.Sequential`` (``""``: the model itself)."""
    start: int
    count: int
    modules: int = 0
    """Modules inside the run's blocks (how the largest run is chosen)."""

    def block(self, j: int) -> str:
        """The path of the run's j-th block (0-based within the run)."""
        name = str(self.start + j)
        return f"{self.container}.{name}" if self.container else name

    def locate(self, path: str) -> tuple[int, str] | None:
        """(block within the run, path inside the block) of a module path, None outside the run."""
        if self.container:
            if not path.startswith(self.container + "."):
                return None
            path = path[len(self.container) + 1:]
        head, _, rest = path.partition(".")
        if not head.isdigit() or int(head) < self.start:
            return None
        return int(head) - self.start, rest


def _module_tokens(paths: list[str], run: Run) -> list[tuple[tuple, int | None]]:
    """Per module index: its token (``("B", path in block)`` or ``("N", path)``) and its block in the run."""
    out = []
    for path in paths:
        where = run.locate(path)
        out.append((("N", path), None) if where is None else (("B", where[1]), where[0]))
    return out


_OUTSIDE = (("N", None), None)


def _order(sig: tuple) -> tuple:
    cat, (where, path), nbytes = sig
    return cat, where, path or "", nbytes


def encode(history: History, run: Run) -> list[tuple]:
    """The history as tokens that name neither blocks nor storage serials (see the module docstring)."""
    modules = _module_tokens(history.paths, run)
    tokens: list[tuple] = []
    live: dict[tuple, list[int]] = {}
    kind: dict[int, tuple] = {}
    last_event = {sid: i for i, (_, sid, _) in enumerate(history.events)}
    size: dict[int, int] = {}
    home: dict[int, int | None] = {}  # the block a storage was allocated in
    block = -1

    def step(b: int | None) -> int | None:
        nonlocal block
        if b is None:
            return None
        d, block = b - block, b
        return d

    ops, sid_cat, sid_module, events = history.ops, history.sid_cat, history.sid_module, history.events
    next_op = 0
    i = 0
    while i < len(events):
        op_index, sid, delta = events[i]
        while next_op < op_index:
            func, m, phase, steps = ops[next_op]
            mtok, b = modules[m] if m >= 0 else _OUTSIDE
            tokens.append(("op", func, mtok, step(b), phase, steps))
            next_op += 1
        if sid not in kind:
            m = sid_module[sid]
            mtok, b = modules[m] if m >= 0 else _OUTSIDE
            kind[sid] = sig = (sid_cat[sid], mtok, delta)
            live.setdefault(sig, []).append(sid)
            size[sid] = delta
            home[sid] = b
            tokens.append(("a", sig, step(b)))
            i += 1
            continue
        # Storages freed together (before one op) may go in any order: the autocast cache is
        # a hash map of pointers. Oldest first within each kind makes the order canonical;
        # the figures do not depend on it (a free changes no peak, and freed blocks merge alike).
        j = i
        while (j < len(events) and events[j][0] == op_index and events[j][1] in kind and last_event[events[j][1]] == j
               and size[events[j][1]] + events[j][2] == 0):
            j += 1
        if j == i:  # a resize, or a storage that shrinks to nothing and grows again
            group, freed = [events[i]], False
        else:
            group, freed = sorted(events[i:j], key=lambda e: (_order(kind[e[1]]), live[kind[e[1]]].index(e[1]))), True
        for _, sid, delta in group:
            sig = kind[sid]
            same = live[sig]
            at = same.index(sid)
            newest = len(same) - 1 - at
            size[sid] += delta
            ref = ("new", newest) if newest <= at else ("old", at)
            if not freed and home[sid] is not None:
                # A block's storage kept and resized (FSDP's gathered parameters): named by its block's
                # step from the current one, and its rank among that block's storages of its kind.
                ref = ("blk", home[sid] - block, [x for x in same if home[x] == home[sid]].index(sid))
            tokens.append(("f" if freed else "r", delta, sig, ref))
            if freed:
                del same[at]
        i = max(j, i + 1)
    while next_op < len(ops):
        func, m, phase, steps = ops[next_op]
        mtok, b = modules[m] if m >= 0 else _OUTSIDE
        tokens.append(("op", func, mtok, step(b), phase, steps))
        next_op += 1
    return tokens


def _decode(tokens: list[tuple], run: Run, paths: list[str], like: History) -> History | None:
    """The history the tokens stand for, with module indices into ``paths`` (None if a path is not there)."""
    index = {p: i for i, p in enumerate(paths)}
    ops: list[tuple] = []
    events: list[tuple[int, int, int]] = []
    sid_cat: list[int] = []
    sid_module: list[int] = []
    live: dict[tuple, list[int]] = {}
    home: list[int | None] = []  # the block each storage was allocated in
    block = -1

    def module(mtok: tuple, d: int | None) -> int | None:
        nonlocal block
        if mtok[0] == "N":
            return -1 if mtok[1] is None else index.get(mtok[1])
        block += d
        if not 0 <= block < run.count:
            return None
        base = run.block(block)
        return index.get(f"{base}.{mtok[1]}" if mtok[1] else base)

    for tok in tokens:
        kind = tok[0]
        if kind == "op":
            _, func, mtok, d, phase, steps = tok
            m = module(mtok, d)
            if m is None:
                return None
            ops.append((func, m, phase, steps))
        elif kind == "a":
            _, sig, d = tok
            m = module(sig[1], d)
            if m is None:
                return None
            sid = len(sid_cat)
            sid_cat.append(sig[0])
            sid_module.append(m)
            home.append(block if sig[1][0] == "B" else None)
            live.setdefault(sig, []).append(sid)
            events.append((len(ops), sid, sig[2]))
        else:
            _, delta, sig, ref = tok
            same = live.get(sig, [])
            if ref[0] == "blk":
                ranked = [x for x in same if home[x] == block + ref[1]]
                if ref[2] >= len(ranked):
                    return None
                at = same.index(ranked[ref[2]])
            else:
                end, rank = ref
                if rank >= len(same):
                    return None
                at = len(same) - 1 - rank if end == "new" else rank
            sid = same[at]
            if kind == "f":
                del same[at]
            events.append((len(ops), sid, delta))
    return with_peak(like, paths, ops, events, sid_cat, sid_module)


def with_peak(like: History, paths, ops, events, sid_cat, sid_module) -> History:
    """A history of these records, its peak found by replaying them (the ledger notes it after each allocation)."""
    live_cat = [0] * len(like.categories)
    live = peak = peak_event = peak_op = 0
    for i, (op_index, sid, delta) in enumerate(events):
        live += delta
        live_cat[sid_cat[sid]] += delta
        if delta > 0 and live > peak:
            peak, peak_event, peak_op = live, i + 1, op_index
    return like._replace(paths=paths, ops=ops, events=events, sid_cat=sid_cat, sid_module=sid_module,
                         peak=peak, peak_event=peak_event, peak_op=peak_op, live_cat=live_cat)


def _insertions(short: list[tuple], longer: list[tuple]) -> list[tuple[int, list[tuple]]] | None:
    """Where ``longer`` inserts tokens into ``short``, and which; None if it also changes or drops some.

    Diffed as units (an op and the events before it) first, so that an inserted run of ops
    cannot be matched across the end of a region (the optimizer's ops, then the frees of
    zero_grad): within a unit that changed, token by token.
    """
    units, longer_units = _units(short), _units(longer)
    offset = [0]
    for unit in units:
        offset.append(offset[-1] + len(unit))
    chunks = []
    matcher = difflib.SequenceMatcher(None, units, longer_units, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if tag == "delete":
            return None
        if tag == "insert":
            chunks.append((offset[i1], [t for unit in longer_units[j1:j2] for t in unit]))
            continue
        # Units that changed: each is matched with a unit of the same op (the last ones, else the
        # first), gains events, and the longer side's other units are inserted whole.
        found = _unit_insertions(units[i1:i2], longer_units[j1:j2])
        if found is None:
            # The inserted records begin inside a unit (FSDP's all-gather prefetched in the previous
            # block's backward, before that unit's op): token by token over the region; the check
            # at one more block verifies the prediction.
            found = _token_insertions([t for unit in units[i1:i2] for t in unit],
                                      [t for unit in longer_units[j1:j2] for t in unit])
            if found is None:
                return None
        chunks += [(offset[i1] + at, chunk) for at, chunk in found]
    chunks.sort(key=lambda c: c[0])
    return chunks


def _unit_insertions(short: list[tuple], longer: list[tuple]) -> list[tuple[int, list[tuple]]] | None:
    """Insertions into a region of changed units, unit by unit (offsets from the region's start), or None."""
    changed = _changed_units(short, longer) if len(longer) >= len(short) else None
    if changed is None:
        return None
    extra_at, extra, pairs = changed
    starts = [0]
    for unit in short:
        starts.append(starts[-1] + len(unit))
    chunks = [(starts[extra_at], [t for unit in extra for t in unit])] if extra else []
    for k, (unit, longer_unit) in enumerate(pairs):
        inner = _token_insertions(list(unit), list(longer_unit))
        if inner is None:
            return None
        chunks += [(starts[k] + at, chunk) for at, chunk in inner]
    return chunks


def _changed_units(short: list[tuple], longer: list[tuple]):
    """(where the longer side's extra units go, those units, the pairs of matched units), or None."""
    a = len(short)
    extra = len(longer) - a
    for at, matched, inserted in ((0, longer[extra:], longer[:extra]), (a, longer[:a], longer[a:])):
        if all(s[-1] == m[-1] for s, m in zip(short, matched)):
            return at, inserted, list(zip(short, matched))
    return None


def _units(tokens: list[tuple]) -> list[tuple]:
    out, unit = [], []
    for t in tokens:
        unit.append(t)
        if t[0] == "op":
            out.append(tuple(unit))
            unit = []
    if unit:
        out.append(tuple(unit))
    return out


def _token_insertions(short: list[tuple], longer: list[tuple]) -> list[tuple[int, list[tuple]]] | None:
    chunks = []
    for tag, i1, _i2, j1, j2 in difflib.SequenceMatcher(None, short, longer, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag != "insert":
            return None
        chunks.append((i1, longer[j1:j2]))
    return chunks


def _expand(tokens: list[tuple], grown: list[tuple[list[tuple[int, list[tuple]]], int]]) -> list[tuple]:
    """``tokens`` with each segment's inserted chunks repeated as many times as it has blocks to add."""
    inserts = sorted(((at, s, i), chunk * copies) for s, (chunks, copies) in enumerate(grown)
                     for i, (at, chunk) in enumerate(chunks))
    out: list[tuple] = []
    done = 0
    for (at, _, _), chunk in inserts:
        out += tokens[done:at]
        out += chunk
        done = at
    out += tokens[done:]
    return out


def extrapolate(base: History, longer: list[tuple[History, int]], run: Run, paths: list[str],
                check: tuple[History, list[int]] | None = None) -> tuple[History | None, str]:
    """The history of the model with all its blocks, from cuts of it.

    ``base`` is the step cut short; ``longer`` has, for each segment of blocks that grows
    (blocks checkpointed alike), the step with one block more in that segment and how many
    blocks it lacks at full depth. ``check`` is a step with more blocks than any of them and,
    per growing segment, how many more than ``base``: it must be predicted token for token
    (left out where the same step was checked before). ``paths`` are the full model's module
    paths. Returns the history, or None and why it cannot be extrapolated exactly.
    """
    where = run.container or "the model"
    first = encode(base, run)
    grown = []
    for history, copies in longer:
        chunks = _insertions(first, encode(history, run))
        if not chunks:
            return None, f"the step with one more block of {where} is not the step plus that block's records"
        grown.append((chunks, copies))
    if check is not None:
        history, copies = check
        if _expand(first, [(chunks, k) for (chunks, _), k in zip(grown, copies)]) != encode(history, run):
            return None, (f"the step with two more blocks of {where} is not predicted by those with none and one "
                          "more (the blocks differ in what they allocate)")
    history = _decode(_expand(first, grown), run, paths, base)
    if history is None:
        return None, "the extrapolated records name modules the full model does not have"
    return history, ""


def canonical(history: History) -> History:
    """The history with storages freed together (before one op) in the order they were allocated.

    Their order is otherwise arbitrary (autocast's cache is a hash map of pointers), and no
    figure depends on it: a free raises no peak, and freed blocks merge alike.
    """
    events = list(history.events)
    last = {sid: i for i, (_, sid, _) in enumerate(events)}
    i = 0
    while i < len(events):
        j = i
        while j < len(events) and events[j][0] == events[i][0] and events[j][2] < 0 and last[events[j][1]] == j:
            j += 1
        if j - i > 1:
            events[i:j] = sorted(events[i:j], key=lambda e: e[1])
        i = max(j, i + 1)
    return history._replace(events=events)
