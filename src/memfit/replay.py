"""Trace replay: append copies of a recorded training step to a ledger's history without running them.

A later step of a training loop repeats the allocations of the first, except
those of the storages the first created and kept (optimizer state, a
GradScaler's scale), which exist from the copy's start. ``memfit.estimate``
traces one step on fake tensors and replays it for the others; its tests check
that replayed and run steps give identical figures (peak, categories, phases,
modules, allocator).
"""

from __future__ import annotations

from memfit.ledger import StorageLedger

__all__ = ["repeat_since"]


def repeat_since(ledger: StorageLedger, position: tuple[int, int, int, int], times: int = 1) -> bool:
    """Append ``times`` copies of the step(s) recorded since ``position`` (from ``ledger.position()``).

    The copies are appended to the history (ops, events, peak, steps) as if run.
    Returns False, appending nothing, when the recorded window cannot be
    repeated that way: it freed or resized a storage created before it, or one
    it keeps at a size it was resized to. Op names may differ from a run where
    an optimizer's first step differs from later ones (SGD's clone vs mul_/add_;
    FSDP2's first all-gather allocates what later ones regrow by a resize).
    """
    e0, o0, sid0, steps0 = position
    window = ledger.events[e0:]
    if any(sid < sid0 for _, sid, _ in window):
        return False
    kept = {rec.sid for rec in ledger.recs.values() if rec.sid >= sid0 and rec.nbytes}
    # Storages kept at no size (FSDP2's gathered parameters, resized to nothing after each use) come back in a
    # later step by the same resizes: their events repeat on the same storage, the first as a resize from 0.
    regrown = {rec.sid for rec in ledger.recs.values() if rec.sid >= sid0 and not rec.nbytes}
    events_of_kept = [sid for _, sid, _ in window if sid in kept]
    if len(events_of_kept) != len(set(events_of_kept)):
        return False  # a storage kept at a size it was resized to: its later steps are not this one's
    ops = ledger.ops[o0:]
    # Ops whose only effect was creating kept storages (AdamW's lazy zeros_like)
    # do not run again in a later step: leave them out of the copies.
    creating: dict[int, bool] = {}
    for op, sid, _ in window:
        creating[op] = creating.get(op, True) and sid in kept
    skipped = {op - o0 for op, only_kept in creating.items() if only_kept}
    index = []  # window op offset -> offset in a copy
    for i in range(len(ops) + 1):
        index.append(i - sum(1 for j in skipped if j < i))
    steps_per_copy = ledger.steps - steps0
    sid_cat, sid_module, events, live_cat = ledger.sid_cat, ledger.sid_module, ledger.events, ledger.live_cat
    for _ in range(times):
        base = len(ledger.ops)
        step_offset = ledger.steps - steps0
        ledger.ops.extend(
            (func, module, phase, step + step_offset)
            for i, (func, module, phase, step) in enumerate(ops)
            if i not in skipped
        )
        new_sid: dict[int, int] = {}
        for op, sid, delta in window:
            if sid in kept:
                continue
            copy = sid if sid in regrown else new_sid.get(sid)
            if copy is None:
                copy = new_sid[sid] = len(sid_cat)
                sid_cat.append(sid_cat[sid])
                sid_module.append(sid_module[sid])
            ledger.live += delta
            live_cat[sid_cat[copy]] += delta
            events.append((base + index[op - o0], copy, delta))
            if delta > 0 and ledger.live > ledger.peak:
                ledger.peak = ledger.live
                ledger.peak_event = len(events)
                ledger.peak_op = base + index[op - o0]
        ledger.steps += steps_per_copy
    return True
