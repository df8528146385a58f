import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit import UsageError, format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", 3 * 2**29),
        ("24GB", 24 * 10**9),
        ("100KB", 100_000),
        ("1.1GB", 1_100_000_000),
        ("2kib", 2048),
        ("7", 7),
        (" 8 B ", 8),
        (123, 123),
        (0, 0),
    ],
)
def test_parse_bytes_accepts(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["24 gigs", "-1GiB", "", "12XB", "GiB", "1.2.3MiB", -1, 1.5, None, True])
def test_parse_bytes_rejects_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="bad byte quantity") as info:
        parse_bytes(bad)
    assert isinstance(info.value, UsageError)


def test_parse_bytes_error_names_forms():
    with pytest.raises(ValueError, match=r'"24GiB".*KiB, MiB, GiB'):
        parse_bytes("24 gigs")
    with pytest.raises(ValueError, match="must not be negative"):
        parse_bytes("-1GiB")


@pytest.mark.parametrize(
    "n, text, decimal_text",
    [
        (0, "0 B", "0 B"),
        (1023, "1023 B", "1.02 KB"),
        (1024, "1.00 KiB", "1.02 KB"),
        (1536, "1.50 KiB", "1.54 KB"),
        (2**20, "1.00 MiB", "1.05 MB"),
        (24 * 2**30, "24.00 GiB", "25.77 GB"),
        (10**9, "953.67 MiB", "1.00 GB"),
        (-2048, "-2.00 KiB", "-2.05 KB"),
    ],
)
def test_format_bytes(n, text, decimal_text):
    assert format_bytes(n) == text
    assert format_bytes(n, decimal=True) == decimal_text


def test_round_trip_of_formatted_binary_units():
    for n in (2**10, 3 * 2**20, 24 * 2**30):
        assert parse_bytes(format_bytes(n).replace(" ", "")) == n


def test_format_bytes_rejects_floats():
    with pytest.raises(TypeError):
        format_bytes(1.5)


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=2**70), st.booleans())
def test_formatted_bytes_parse_back_exactly_where_two_decimals_can_say_it(n, decimal):
    text = format_bytes(n, decimal=decimal)
    back = parse_bytes(text)
    base = 1000 if decimal else 1024
    unit = max((base**e for e in range(6) if base**e <= n), default=1)
    unit = min(unit, base**5)  # PiB / PB is the largest unit
    if (n * 100) % unit == 0:  # n is a whole number of hundredths of its unit: printed exactly
        assert back == n
    else:  # two decimals round to the nearest hundredth; the parser rounds down to a byte
        assert abs(back - n) <= unit // 200 + 1


def test_budgets_take_card_names_meaning_what_cuda_reports():
    from memfit.units import CARDS

    assert parse_bytes("rtx4090") == parse_bytes("RTX-4090") == parse_bytes("4090") == int(23.64 * 2**30)
    assert parse_bytes("a100-80gb") == parse_bytes("A100_80GB") == int(79.14 * 2**30)
    assert parse_bytes("h100") == int(79.11 * 2**30) and parse_bytes("t4") == int(14.56 * 2**30)
    assert parse_bytes("l4") == int(22.00 * 2**30) and parse_bytes("V100") == int(15.77 * 2**30)
    # Each card's CUDA total is below what it is sold as in GB, and below nvidia-smi's MiB figure.
    for name, (size, source) in CARDS.items():
        assert 14 * 2**30 < size < 80 * 2**30 and "GiB" in source and "issue" in source
    with pytest.raises(ValueError, match=r"or a card: t4, v100, l4, a10, rtx3090, rtx4090"):
        parse_bytes("rtx9090")


@pytest.mark.parametrize("text, message", [
    ("0.5", "a fraction of a byte"), ("1.9B", "a fraction of a byte"), ("-1GB", "must not be negative"),
])
def test_fractions_of_a_byte_and_negative_sizes_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse_bytes(text)
    assert parse_bytes("1.5KB") == 1500 and parse_bytes("22.35 GiB") == 23998129766  # a unit's fraction rounds down


def test_budgets_show_both_forms_where_gib_and_gb_differ_by_more_than_5_percent():
    from memfit.units import format_budget

    assert format_budget(24 * 10**9) == "22.35 GiB (24.00 GB)"
    assert format_budget(24 * 2**30) == "24.00 GiB (25.77 GB)"
    assert format_budget(5 * 2**20) == "5.00 MiB"  # 5.24 MB: 4.6% apart, one form is enough
    assert format_budget(1000) == "1000 B"
