"""Trends of noisy series are read from the means of their ends, not from one step."""

from __future__ import annotations

import numpy as np
import pytest

from kalm.analysis import trend


def test_one_spike_at_the_end_is_not_a_rise():
    values = [4.0] * 99 + [7.7]
    t = trend(values)
    assert t.first == 4.0
    assert t.last == pytest.approx(4.0 + 3.7 / 20)
    assert t.direction(tolerance=0.5) == "stays level"


def test_directions_and_nan():
    assert trend([1, 1, 2, 2, np.nan, 3, 3]).direction(0.1) == "rises"
    assert trend(np.linspace(5, 1, 50)).direction(0.1) == "falls"
    assert trend([2.0]).change == 0.0


@pytest.mark.parametrize("bad", [0.0, 0.6])
def test_fraction_is_checked(bad):
    with pytest.raises(ValueError, match="fraction"):
        trend([1, 2, 3], fraction=bad)


def test_empty_series_is_an_error():
    with pytest.raises(ValueError, match="no finite"):
        trend([np.nan])
