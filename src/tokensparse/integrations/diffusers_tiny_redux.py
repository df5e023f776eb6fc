"""A tiny random-weight FLUX.1 Redux prior and the FLUX.1 pipeline that takes its output, for tests.

Both reuse :func:`.diffusers_tiny.tiny_flux_kontext`'s components (its 16-wide CLIP and T5 text encoders, so the
prior's T5 width is the transformer's ``joint_attention_dim``); the prior adds a 1-layer SigLIP vision model that
cuts a 32 px image into 8 x 8 = 64 patches and a ``ReduxImageEncoder`` projecting them to 16 channels.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_flux_kontext

__all__ = ["redux_flux_call_kwargs", "tiny_flux_for_redux", "tiny_flux_redux"]

REDUX_TOKENS = 64  # image tokens the tiny prior appends to the prompt (an 8 x 8 SigLIP grid)


@needs("diffusers", "transformers")
def tiny_flux_redux(seed: int = 0) -> Any:
    """A ``FluxPriorReduxPipeline``: tiny SigLIP (32 px, 4 px patches), ``ReduxImageEncoder`` and text encoders."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    encoders = {k: v for k, v in tiny_flux_kontext(seed=seed).components.items()
                if k.startswith(("text_encoder", "tokenizer"))}
    torch.manual_seed(seed)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=4)).eval()
    return FluxPriorReduxPipeline(
        image_encoder=siglip, feature_extractor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        image_embedder=ReduxImageEncoder(redux_dim=16, txt_in_features=16).eval(), **encoders)


@needs("diffusers", "transformers")
def tiny_flux_for_redux(seed: int = 0) -> Any:
    """A ``FluxPipeline`` without text encoders (the prior's output is its prompt), with
    :func:`tiny_flux_kontext`'s transformer, VAE and scheduler."""
    from diffusers import FluxPipeline

    comps = dict(tiny_flux_kontext(seed=seed).components)
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        comps[name] = None
    return FluxPipeline(**{k: v for k, v in comps.items() if k not in ("image_encoder", "feature_extractor")})


def redux_flux_call_kwargs(steps: int = 2, size: int = 32) -> dict[str, Any]:
    """``FluxPipeline`` call arguments that fit :func:`tiny_flux_for_redux` (add the prior's output)."""
    return {"num_inference_steps": steps, "height": size, "width": size, "output_type": "np"}
