"""The mutation score of `make mutate`, equivalent mutants excluded, and what survived.

mutmut (3.8) keeps each mutant's outcome in ``mutants/<source>.meta`` (JSON, one
exit code per mutant). This reads those files, leaves out the mutants listed in
``tools/equivalent_mutants.toml`` (each with the change it makes and why no test
can tell it from the original), and prints the score per module and in all,
then every mutant no test killed, as the one-line change it makes.

An entry of the equivalent list names a mutant and the change it makes. mutmut
numbers mutants within a function, so an edit of that function renumbers them:
an entry whose mutant no longer makes the listed change is stale, is counted as
a survivor and is reported, never silently kept.

Detected: killed, timed out, crashed. Not detected: survived, no test ran it,
suspicious. Not checked yet (an interrupted run): reported apart, out of the score.

Usage (from the repository root, after ``mutmut run``)::

    python tools/mutation_score.py            # the score and the survivors
    python tools/mutation_score.py --all      # also the survivors' full diffs
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tools" / "equivalent_mutants.toml"

# mutmut's exit codes (mutmut/stats.py, status_by_exit_code).
_KILLED = {1, 3}
_TIMEOUT = {36, 24, -24, 152, 255}
_CRASHED = {-11, -9}
_TYPE_CHECKED = {37}
_SURVIVED = {0}
_NO_TESTS = {5, 33}
_SKIPPED = {34}


def _status(code: int | None) -> str:
    if code is None:
        return "not checked"
    if code in _KILLED or code in _TYPE_CHECKED:
        return "killed"
    if code in _TIMEOUT:
        return "timeout"
    if code in _CRASHED:
        return "crashed"
    if code in _SURVIVED:
        return "survived"
    if code in _NO_TESTS:
        return "no tests"
    if code in _SKIPPED:
        return "skipped"
    return "suspicious"


_DETECTED = {"killed", "timeout", "crashed"}
_UNDETECTED = {"survived", "no tests", "suspicious"}


def change_of(mutant: str, path: str) -> str:
    """The lines a mutant removes and adds, as ``-old`` / ``+new`` lines (stripped of indentation)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # the dev extra; mutants/ must exist

    lines = get_diff_for_mutant(mutant, path=path).splitlines()
    return "\n".join(
        line[0] + line[1:].strip()
        for line in lines
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )


def load_equivalent() -> dict[str, dict[str, str]]:
    if not EQUIVALENT.exists():
        return {}
    data = tomllib.loads(EQUIVALENT.read_text())
    entries = {}
    for entry in data.get("equivalent", []):
        missing = {"mutant", "change", "reason"} - set(entry)
        if missing:
            raise SystemExit(f"{EQUIVALENT}: an entry lacks {sorted(missing)}: {entry}")
        entries[entry["mutant"]] = entry
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="print each survivor's full diff")
    args = parser.parse_args(argv)

    metas = sorted((ROOT / "mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutate` first", file=sys.stderr)
        return 2
    equivalent = load_equivalent()
    used: set[str] = set()
    rows = []
    survivors: list[tuple[str, str, str]] = []
    stale: list[str] = []
    totals: Counter = Counter()
    for meta in metas:
        source = str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts: Counter = Counter()
        for mutant, code in codes.items():
            status = _status(code)
            if status in _UNDETECTED and mutant in equivalent:
                listed = equivalent[mutant]["change"].strip()
                if change_of(mutant, source) == listed:
                    used.add(mutant)
                    counts["equivalent"] += 1
                    continue
                stale.append(mutant)
            counts[status] += 1
            if status in _UNDETECTED:
                survivors.append((mutant, source, status))
        totals.update(counts)
        path = Path(source)  # src/memfit/engine/guard.py is shown as engine/guard
        rows.append((str(path.relative_to("src/memfit").with_suffix("")) if path.parts[:2] == ("src", "memfit")
                     else path.stem, counts))

    def score(c: Counter) -> str:
        detected = sum(c[s] for s in _DETECTED)
        judged = detected + sum(c[s] for s in _UNDETECTED)
        return f"{100 * detected / judged:5.1f}%" if judged else "   - "

    print(f"{'module':<16} {'score':>6} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} "
          f"{'equivalent':>10} {'unchecked':>9}")
    for name, c in rows:
        print(f"{name:<16} {score(c):>6} {c['killed'] + c['crashed']:>7} {c['timeout']:>7} "
              f"{c['survived'] + c['suspicious']:>8} {c['no tests']:>8} {c['equivalent']:>10} {c['not checked']:>9}")
    if survivors:
        print(f"\nNot killed ({len(survivors)}):")
        for mutant, source, status in survivors:
            change = change_of(mutant, source)
            print(f"  {mutant} [{status}]" + ("" if args.all else "  " + " | ".join(change.splitlines())[:200]))
            if args.all:
                print("    " + change.replace("\n", "\n    "))
    for mutant in stale:
        print(f"stale entry in {EQUIVALENT.name}: {mutant} no longer makes the listed change; re-check it")
    for mutant in sorted(set(equivalent) - used - set(stale)):
        print(f"unused entry in {EQUIVALENT.name}: {mutant} (killed now, or not generated)")
    detected = sum(totals[s] for s in _DETECTED)
    judged = detected + sum(totals[s] for s in _UNDETECTED)
    modules = ", ".join(name for name, _ in rows)
    print(f"\nmutation score {score(totals).strip()}: {detected} of {judged} mutants killed "
          f"({totals['equivalent']} equivalent excluded, {totals['not checked']} not checked) over {modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
