"""Models: RefDiT, the testbed, and its named configs and shipped checkpoints."""

from .refdit import RefDiT, RefDiTBlock, RefDiTConfig
from .zoo import CHECKPOINTS, CONFIGS, build_model, list_models, load_checkpoint, load_model, save_checkpoint

__all__ = ["CHECKPOINTS", "CONFIGS", "RefDiT", "RefDiTBlock", "RefDiTConfig", "build_model", "list_models",
           "load_checkpoint", "load_model", "save_checkpoint"]
