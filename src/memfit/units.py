"""Byte quantities: one checked parser and one formatter.

memfit counts int bytes everywhere; units appear only at the edges (CLI flags,
tables, messages). Binary units (KiB, MiB, GiB, TiB, PiB) are powers of 1024, decimal
units (KB, MB, GB, TB, PB) powers of 1000, as in IEC 80000-13: "24GB" is 24e9
bytes, which is what a GPU vendor's "24 GB" means, and "24GiB" is 24 * 2**30.
"""

from __future__ import annotations

import math
import re

from memfit.errors import UsageError

__all__ = ["parse_bytes", "format_bytes"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "PIB": 2**50,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_FORMS = (
    'a whole number of bytes (1048576) or a number with a unit: "24GiB", "512MiB", '
    '"1.5 GiB", "24GB" (= 24e9), "100KB"; units: B, KB, MB, GB, TB, PB (powers of 1000), '
    "KiB, MiB, GiB, TiB, PiB (powers of 1024)"
)


def parse_bytes(value: str | int) -> int:
    """Parse a byte quantity into int bytes.

    Args:
        value: an int (bytes), or a string such as ``"24GiB"``, ``"1.5 GiB"``,
            ``"24GB"`` or ``"100KB"``. Units are case-insensitive.

    Returns:
        The number of bytes, rounded down to a whole byte.

    Raises:
        UsageError (a ValueError): for anything else, naming the accepted forms.

    Example:
        >>> parse_bytes("1.5 GiB")
        1610612736
        >>> parse_bytes("24GB")
        24000000000
    """
    if isinstance(value, bool):
        raise UsageError(f"bad byte quantity {value!r}: expected {_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"bad byte quantity {value!r}: it must not be negative")
        return value
    if not isinstance(value, str):
        raise UsageError(f"bad byte quantity {value!r} of type {type(value).__name__}: expected {_FORMS}")
    match = _PATTERN.match(value)
    if match is None and value.strip().startswith("-"):
        raise UsageError(f"bad byte quantity {value!r}: it must not be negative; expected {_FORMS}")
    if match is None:
        raise UsageError(f"bad byte quantity {value!r}: expected {_FORMS}")
    number, unit = match.groups()
    factor = _UNITS.get(unit.upper())
    if factor is None:
        raise UsageError(f"bad byte quantity {value!r}: unknown unit {unit!r}; expected {_FORMS}")
    if "." in number:
        # Decimal arithmetic on the digits avoids float error: "1.1GB" is exactly 1.1e9.
        whole, frac = number.split(".")
        scale = 10 ** len(frac)
        return (int(whole or "0") * scale + int(frac or "0")) * factor // scale
    return int(number) * factor


def format_bytes(n: int, *, decimal: bool = False, precision: int = 2) -> str:
    """Format int bytes for people: ``format_bytes(1536) == "1.50 KiB"``.

    Binary units by default (what CUDA's allocator and ``nvidia-smi`` mean by
    MiB and GiB); ``decimal=True`` gives KB/MB/GB. Values under one unit print
    as plain bytes. Negative values (deltas) keep their sign.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"format_bytes takes int bytes, got {type(n).__name__}")
    sign = "-" if n < 0 else ""
    n = abs(n)
    base, units = (1000, ("KB", "MB", "GB", "TB", "PB")) if decimal else (1024, ("KiB", "MiB", "GiB", "TiB", "PiB"))
    if n < base:
        return f"{sign}{n} B"
    exponent = min(int(math.log(n, base)), len(units))
    # log() can land just under an integer for exact powers; correct it.
    while exponent < len(units) and n >= base ** (exponent + 1):
        exponent += 1
    while exponent > 1 and n < base**exponent:
        exponent -= 1
    return f"{sign}{n / base**exponent:.{precision}f} {units[exponent - 1]}"
