"""Neural-network layers of a BitNet b1.58 transformer, in numpy on top of ``bn.matmul``.

Every layer is a plain object called on float32 activations of shape ``(tokens, features)``.
Inside ``with bn.nn.step():`` the layers' temporaries come from the default arena and are
released when the step ends; outside a step a layer returns arrays the caller owns.

Names load on first use, so the shared argument checks (``bitnet.nn.checks``, which the
config uses) come without the Numba kernels.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:  # the lazy names spelled out for type checkers, IDEs and the API docs; never run
    from .attention import Attention, KVCache
    from .embedding import Embedding
    from .linear import BitLinear
    from .mlp import MLP
    from .norm import RMSNorm
    from .rope import RotaryEmbedding
    from .scratch import step

# The submodule each name comes from, as imported above (tests/test_import.py holds the two
# equal); none is also a submodule's name (it would be shadowed).
_HOMES = {
    "Attention": "attention", "KVCache": "attention",
    "Embedding": "embedding",
    "BitLinear": "linear",
    "MLP": "mlp",
    "RMSNorm": "norm",
    "RotaryEmbedding": "rope",
    "step": "scratch",
}

__all__ = ["MLP", "Attention", "BitLinear", "Embedding", "KVCache", "RMSNorm", "RotaryEmbedding", "step"]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
