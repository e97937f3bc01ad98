"""Models built from ``bitnet.nn`` layers: the BitNet b1.58 causal LM, its config, sampling, and the bundled model.

Names load on first use, so ``BitNetConfig`` and ``bundled_path`` need no Numba kernels.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:  # the lazy names spelled out for type checkers, IDEs and the API docs; never run
    from .bitnet import BitNetForCausalLM, DecoderLayer
    from .bundled import bundled_path
    from .config import BitNetConfig
    from .random import random_model
    from .sampling import Sampler

# The submodule each name comes from, as imported above (tests/test_import.py holds the two
# equal); none is also a submodule's name (it would be shadowed).
_HOMES = {
    "BitNetConfig": "config",
    "BitNetForCausalLM": "bitnet", "DecoderLayer": "bitnet",
    "Sampler": "sampling",
    "bundled_path": "bundled",
    "random_model": "random",
}

__all__ = ["BitNetConfig", "BitNetForCausalLM", "DecoderLayer", "Sampler", "bundled_path", "random_model"]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
