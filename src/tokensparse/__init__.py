"""tokensparse: faster reference-conditioned diffusion transformers by processing fewer tokens.

    import tokensparse as ts
    model = ts.load_model("refdit-sparse")
    ts.apply_sparse_context(model, ts.SparseContextConfig(keep=0.25, selector="uniform"))
    images = ts.generate(model, [ref], "place the subject top left", steps=20)
    ts.remove_sparse_context(model)
"""

from .api import apply_sparse_context, remove_sparse_context
from .context import SparseContextConfig
from .generate import generate
from .generation import begin_generation
from .guidance import CFGConfig, SparseGuidanceConfig
from .integrations.merging_hooks import apply_token_merging, remove_token_merging
from .merging import TokenMergingConfig
from .models import RefDiT, RefDiTConfig, build_model, list_models, load_model
from .vocab import tokenize

__version__ = "0.23.0"

__all__ = [
    "CFGConfig",
    "RefDiT",
    "RefDiTConfig",
    "SparseContextConfig",
    "SparseGuidanceConfig",
    "TokenMergingConfig",
    "apply_sparse_context",
    "apply_token_merging",
    "begin_generation",
    "build_model",
    "generate",
    "list_models",
    "load_model",
    "remove_sparse_context",
    "remove_token_merging",
    "tokenize",
]
