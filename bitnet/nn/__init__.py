"""Neural-network layers of a BitNet b1.58 transformer, in numpy on top of ``bn.matmul``.

Every layer is a plain object called on float32 activations of shape ``(tokens, features)``.
Inside ``with bn.nn.step():`` the layers' temporaries come from the default arena and are
released when the step ends; outside a step a layer returns arrays the caller owns.
"""

from .attention import Attention, KVCache
from .embedding import Embedding
from .linear import BitLinear
from .mlp import MLP
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .scratch import step

__all__ = ["MLP", "Attention", "BitLinear", "Embedding", "KVCache", "RMSNorm", "RotaryEmbedding", "step"]
