"""Byte quantities: one checked parser and one formatter, and the memory of common GPUs.

memfit counts int bytes everywhere; units appear only at the edges (CLI flags,
tables, messages). Binary units (KiB, MiB, GiB, TiB, PiB) are powers of 1024, decimal
units (KB, MB, GB, TB, PB) powers of 1000, as in IEC 80000-13: "24GB" is 24e9
bytes (22.35 GiB), and "24GiB" is 24 * 2**30. A card sold as "24 GB" has neither:
an RTX 4090 lets CUDA use 23.64 GiB. A card's name as a budget (``"rtx4090"``,
``"h100"``) means what CUDA reports for it, from :data:`CARDS`.
"""

from __future__ import annotations

import math
import re

from memfit.errors import UsageError

__all__ = ["parse_bytes", "format_bytes", "format_budget", "CARDS"]

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

CARDS: dict[str, tuple[int, str]] = {
    # What CUDA lets a process use, as PyTorch's out-of-memory message prints it ("GPU 0 has a
    # total capacity of ... GiB"; torch.cuda.mem_get_info()[1]), the smallest seen in public
    # reports; nvidia-smi shows more (its total includes memory the driver keeps). Measured
    # figures vary by a few MiB with the driver: on the machine, --budget auto reads the card.
    "t4": (int(14.56 * 2**30), "14.56 GiB on Colab in 2026, 14.75 GiB with older drivers (nvidia-smi: 15360 MiB); facebookresearch/tribev2 issue 28, Open-Sora issue 697"),
    "v100": (int(15.77 * 2**30), "15.77 GiB, the 16 GB V100; nomic-ai/gpt4all issue 544"),
    # No public out-of-memory message from an L4 was found: nvidia-smi shows 23034 MiB (lmstudio
    # bug-tracker issue 1638), less the 357-510 MiB the driver keeps on the RTX 4090 and the A10
    # (their rows here); the larger share is taken, so the budget errs low, never high.
    "l4": (int(22.00 * 2**30), "22.00 GiB, nvidia-smi's 23034 MiB (lmstudio bug-tracker issue 1638) less the driver's share"),
    "a10": (int(21.99 * 2**30), "21.99 GiB (nvidia-smi: 23028 MiB); CogVLM issue 236"),
    "rtx3090": (int(23.70 * 2**30), "23.70 GiB (nvidia-smi: 24576 MiB); lit-llama issue 137"),
    "rtx4090": (int(23.64 * 2**30), "23.64 GiB (nvidia-smi: 24564 MiB); Phidias-Diffusion issue 8"),
    "a100-40gb": (int(39.50 * 2**30), "39.50 GiB (nvidia-smi: 40960 MiB); CoSeR issue 10"),
    "l40": (int(44.40 * 2**30), "44.40 GiB; Qwen3-VL issue 2097"),
    "h100": (int(79.11 * 2**30), "79.11 GiB, the 80 GB H100 (nvidia-smi: 81559 MiB); vLLM issue 27508"),
    "a100-80gb": (int(79.14 * 2**30), "79.14 GiB (nvidia-smi: 81920 MiB); Control-GIC issue 6"),
}
"""Budgets by card name: bytes CUDA can use on the card, and where the figure comes from."""
_CARD_ALIASES = {"a10g": "a10", "h100-80gb": "h100", "a100": "a100-80gb", "4090": "rtx4090", "3090": "rtx3090"}

_FORMS = (
    'a whole number of bytes (1048576), a number with a unit: "24GiB", "512MiB", '
    '"1.5 GiB", "24GB" (= 24e9), "100KB" (units: B, KB, MB, GB, TB, PB, powers of 1000; '
    "KiB, MiB, GiB, TiB, PiB, powers of 1024), or a card: " + ", ".join(CARDS)
)


def parse_bytes(value: str | int) -> int:
    """Parse a byte quantity into int bytes.

    Args:
        value: an int (bytes), a string such as ``"24GiB"``, ``"1.5 GiB"``,
            ``"24GB"`` or ``"100KB"`` (units are case-insensitive), or a card's
            name from :data:`CARDS` (``"rtx4090"``, ``"a100-80gb"``, ``"h100"``).

    Returns:
        The number of bytes.

    Raises:
        UsageError (a ValueError): a negative value, a fraction of a byte ("0.5",
            "1.9B"), or anything else, naming the accepted forms. A larger unit's
            quantity is rounded down to a whole byte ("22.35 GiB", as memfit prints it).

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
    card = _card(value)
    if card is not None:
        return CARDS[card][0]
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
        bytes_, rest = divmod((int(whole or "0") * scale + int(frac or "0")) * factor, scale)
        if rest and factor == 1:
            raise UsageError(f"bad byte quantity {value!r}: a fraction of a byte; give whole bytes, or a unit "
                             "(\"0.5GiB\")")
        return bytes_  # "22.35 GiB" is 23998129766.4 bytes: the fraction of a byte is dropped
    return int(number) * factor


def _card(value: str) -> str | None:
    key = value.strip().lower().replace("_", "-").replace(" ", "-")
    key = _CARD_ALIASES.get(key, key)
    if key in CARDS:
        return key
    squeezed = key.replace("-", "")
    return next((name for name in CARDS if name.replace("-", "") == squeezed), None)


def format_budget(n: int) -> str:
    """A budget for people: binary units, and the decimal form too where the two differ by more than 5%.

    ``format_budget(24 * 10**9) == "22.35 GiB (24.00 GB)"``: a "24GB" budget is not 24 GiB.
    """
    binary, decimal = format_bytes(n), format_bytes(n, decimal=True)
    (b_number, b_unit), (d_number, d_unit) = binary.split(), decimal.split()
    # "22.35 GiB" read as "22.35 GB" is 7% off: say both where a prefix could be misread.
    if b_unit[0] == d_unit[0] != "B" and abs(float(b_number) - float(d_number)) > 0.05 * float(d_number):
        return f"{binary} ({decimal})"
    return binary


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
