"""Shared test set-up: floating-point errors raised, but not underflow (exp of a very negative
utility underflowing to 0 is correct)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _raise_on_float_errors():
    old = np.seterr(over="raise", invalid="raise", divide="raise", under="ignore")
    yield
    np.seterr(**old)
