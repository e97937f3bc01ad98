"""Shared test helpers: random inputs with awkward sizes."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)
