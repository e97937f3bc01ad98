"""Shared test helpers: random inputs with awkward sizes."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one Numba thread: on a busy machine a thread pool waiting for cores is far slower."""
    import torch

    import bitnet as bn

    threads, numba_threads = torch.get_num_threads(), bn.get_num_threads()
    torch.set_num_threads(1)
    bn.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    bn.set_num_threads(numba_threads)
