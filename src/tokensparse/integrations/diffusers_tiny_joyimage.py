"""Tiny random-weight JoyImage Edit pipelines for tests, built offline (nothing is downloaded).

Text encoder: a one-layer ``Qwen3VLForConditionalGeneration`` (one vision block, 16 px patches merged 2x2) over
:func:`~.diffusers_tiny.tiny_qwen_vl_tokenizer`'s byte vocabulary. Processor: :class:`TinyQwen3VLProcessor`, what
the pipelines call of a ``Qwen3VLProcessor`` (transformers cannot build a real one without torchvision). VAE: a
Wan 2.1-style ``AutoencoderKLWan`` with one downsample (2 pixels per latent cell), so a 32x32 image is 16x16 latent
cells, 8x8 = 64 tokens after the transformer's 2x2 patches.

The pipelines snap every image to a bucket of ``diffusers.pipelines.joyimage.image_processor.BUCKETS[1024]``
(512 to 2048 pixels a side); tests swap in small buckets (:data:`SMALL_BUCKETS`).
"""

from __future__ import annotations

from typing import Any

import torch

from .diffusers_tiny import tiny_qwen_vl_tokenizer

SMALL_BUCKETS = [(32, 32), (32, 48), (48, 32)]  # (height, width): pixel sizes for tiny tests


class TinyQwen3VLProcessor:
    """The part of a ``Qwen3VLProcessor`` the JoyImage pipelines call: ``processor(text=, images=, padding=,
    return_tensors=)`` -> token ids with each ``<|image_pad|>`` grown to its image's merged patch count,
    ``mm_token_type_ids`` (1 on image tokens), ``pixel_values`` and ``image_grid_thw``."""

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def __call__(self, text: list[str], images: Any = None, padding: bool = True, return_tensors: str = "pt") -> Any:
        from transformers import BatchFeature

        data: dict[str, Any] = {}
        if images:
            data = dict(self.image_processor(images=images, return_tensors=return_tensors))
            counts = iter((data["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist())
            text = [self._expand(t, counts) for t in text]
        tokens = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        image_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        data.update(tokens, mm_token_type_ids=(tokens["input_ids"] == image_id).long())
        return BatchFeature(data)

    @staticmethod
    def _expand(text: str, counts: Any) -> str:
        parts = text.split("<|image_pad|>")
        return parts[0] + "".join("<|image_pad|>" * next(counts) + part for part in parts[1:])


def tiny_qwen3_vl(tokenizer: Any, hidden: int = 16) -> Any:
    """A one-layer ``Qwen3VLForConditionalGeneration`` (text width ``hidden``, one vision block) for
    :func:`~.diffusers_tiny.tiny_qwen_vl_tokenizer`'s vocabulary."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(f"<|{t}|>") for t in ("vision_start", "vision_end", "image_pad",
                                                                     "video_pad")}
    head = 8
    config = Qwen3VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": head,
                     "max_position_embeddings": 2048, "bos_token_id": None, "eos_token_id": None,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [1, 1, head // 2 - 2], "mrope_interleaved": True}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": hidden, "num_position_embeddings": 16, "deepstack_visual_indexes": []},
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def _components(seed: int, plus: bool) -> dict[str, Any]:
    import transformers
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        JoyImageEditPlusTransformer3DModel,
        JoyImageEditTransformer3DModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_vl_tokenizer()
    image_processor = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=2).eval()
    cls = JoyImageEditPlusTransformer3DModel if plus else JoyImageEditTransformer3DModel
    transformer = cls(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
                      mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6]).eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": tiny_qwen3_vl(tokenizer),
        "tokenizer": tokenizer,
        "transformer": transformer,
        "processor": TinyQwen3VLProcessor(tokenizer, image_processor(
            patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32, max_pixels=64 * 64)),
    }


def tiny_joyimage_edit(seed: int = 0) -> Any:
    """A ``JoyImageEditPipeline`` (one reference, in the transformer's sequence after the target) with the tiny
    components above."""
    from diffusers import JoyImageEditPipeline

    return JoyImageEditPipeline(**_components(seed, plus=False))


def tiny_joyimage_edit_plus(seed: int = 0) -> Any:
    """A ``JoyImageEditPlusPipeline`` (several references of any size, patchified after the target) with the tiny
    components above."""
    from diffusers import JoyImageEditPlusPipeline

    return JoyImageEditPlusPipeline(**_components(seed, plus=True))
