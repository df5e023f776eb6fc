"""A tiny random-weight ``BriaFibo2Pipeline`` (Fibo 2.0) for tests, built offline (nothing is downloaded).

Text encoder: a 36-layer, width-16 Qwen3-VL (:mod:`.diffusers_tiny_vl`; the pipeline reads hidden states up to
layer 35). VAE: a FLUX.2-style ``AutoencoderKLFlux2`` (/2), so with the transformer's 2x2 patches a 32x32 image is
an 8x8 grid of tokens. ``default_sample_size`` is 16 (the pipeline's is 128): the size it gives the images to edit
(each image's own, about ``(16 * 2)^2`` pixels, when there are several) and an unsized output is 32x32-ish.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs
from .diffusers_tiny import tiny_flux2_vae
from .diffusers_tiny_vl import tiny_qwen3_vl_with_processor


@needs("diffusers", "transformers")
def tiny_bria_fibo2(seed: int = 0) -> Any:
    """A ``BriaFibo2Pipeline`` with a tiny Qwen3-VL text encoder, FLUX.2 VAE and Fibo 2.0 transformer.

    Gist tokens: 4 to 8 (the pipeline's model: 256 to 512), so a prompt of a few hundred byte tokens gets 8.
    """
    from diffusers import (
        BriaFibo2Pipeline,
        BriaFibo2Transformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    torch.manual_seed(seed)
    processor, text_encoder = tiny_qwen3_vl_with_processor(layers=36)
    vae = tiny_flux2_vae()
    transformer = BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        cap_feat_dim=3 * 16,  # three text-encoder layers per bundle
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
        gist_step=4, gist_min_text_len=8, gist_max_text_len=64, axes_dims=(4, 6, 6), axes_lens=(32, 32, 32)).eval()
    pipe = BriaFibo2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=text_encoder, processor=processor)
    pipe.default_sample_size = 16
    return pipe
