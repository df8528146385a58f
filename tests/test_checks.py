"""positive_int: the one check of a count the user gives."""

from __future__ import annotations

import pytest

from memfit import MemfitError, UsageError
from memfit.checks import positive_int


def test_a_count_is_a_whole_number_of_at_least_one():
    assert positive_int(1, "steps") == 1 and positive_int(10**12, "steps") == 10**12


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "4", None])
def test_anything_else_is_refused_naming_the_value(value):
    with pytest.raises(UsageError) as info:
        positive_int(value, "steps")
    assert str(info.value) == f"steps must be a positive int, got {value!r}"


def test_the_message_takes_a_hint_a_noun_and_an_error_type():
    with pytest.raises(UsageError, match=r"^limit must be a positive whole number \(the largest to try\), got 0$"):
        positive_int(0, "limit", hint="the largest to try", noun="whole number")
    with pytest.raises(MemfitError) as info:
        positive_int(0, "round_to", error=MemfitError)
    assert type(info.value) is MemfitError
