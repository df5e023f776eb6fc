"""Tiny random-weight diffusers pipelines, built offline from configs, for tests, demos and the LoRA example.

Nothing is downloaded: the text encoders come from ``transformers`` configs and the tokenizers from a
byte-level vocabulary written here. The images such pipelines make are noise; they exist to exercise
the real pipeline code paths quickly on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@needs("transformers")
def tiny_qwen_tokenizer() -> Any:
    """A byte-level BPE ``Qwen2Tokenizer`` with no merges (one token per byte), with a chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(sorted(set(bytes_to_unicode().values())))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.chat_template = _CHAT_TEMPLATE
    return tok


@needs("diffusers", "transformers")
def tiny_flux2_klein(
    seed: int = 0,
    kv: bool = False,
    is_distilled: bool = False,
    num_layers: int = 1,
    num_single_layers: int = 1,
) -> Any:
    """A ``Flux2KleinPipeline`` (or ``Flux2KleinKVPipeline`` with ``kv=True``) of a few thousand parameters.

    The tiny Qwen3 text encoder has 28 layers of width 16, so the pipeline's default
    ``text_encoder_out_layers=(9, 18, 27)`` works; a short ``max_sequence_length`` (16) keeps calls fast.
    Images must be multiples of 4 pixels (VAE /2, then 2x2 patches): 32x32 gives 8x8 = 64 tokens.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinKVPipeline,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    text_hidden = 16
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=260,
            hidden_size=text_hidden,
            intermediate_size=32,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    ).eval()
    vae = tiny_flux2_vae()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_hidden,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=None)
    cls = Flux2KleinKVPipeline if kv else Flux2KleinPipeline
    kwargs = {} if kv else {"is_distilled": is_distilled}
    return cls(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_qwen_tokenizer(),
        transformer=transformer,
        **kwargs,
    )


def flux2_call_kwargs(steps: int = 2, size: int = 32) -> dict[str, Any]:
    """Call arguments that fit :func:`tiny_flux2_klein`."""
    return {"num_inference_steps": steps, "height": size, "width": size, "max_sequence_length": 16}


@needs("diffusers", "transformers")
def tiny_flux2_vae() -> Any:
    """A tiny random-weight FLUX.2 VAE (``AutoencoderKLFlux2``: 4 latent channels, 2x down), the one the tiny FLUX.2,
    Fibo 2.0, ERNIE-Image and Ideogram 4 pipelines use; draws from torch's global generator."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=32, mid_block_add_attention=False).eval()


@needs("transformers")
def tiny_clip_tokenizer() -> Any:
    """A character-level ``CLIPTokenizer`` (no merges), 16 tokens long."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


@needs("transformers")
def tiny_t5_tokenizer() -> Any:
    """A character-level unigram ``T5Tokenizer``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789.,!?"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


@needs("transformers")
def tiny_clip_encoder(tokenizer: Any) -> Any:
    """A 1-layer, 16-wide ``CLIPTextModel`` for ``tokenizer``'s vocabulary (:func:`tiny_clip_tokenizer`)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


@needs("transformers")
def tiny_t5_encoder(tokenizer: Any) -> Any:
    """A 1-layer, 16-wide ``T5EncoderModel`` for ``tokenizer``'s vocabulary (:func:`tiny_t5_tokenizer`, ByT5)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def _tiny_flux_vae(latent_channels: int) -> Any:
    """A FLUX.1-style ``AutoencoderKL`` (/2 spatially, shift and scaling factors, no quant convs), 32 px."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=4, sample_size=32, shift_factor=0.1, scaling_factor=0.5, use_quant_conv=False,
                         use_post_quant_conv=False).eval()


@needs("diffusers", "transformers")
def tiny_flux_kontext(seed: int = 0) -> Any:
    """A ``FluxKontextPipeline`` with tiny CLIP + T5 text encoders, VAE and transformer.

    Call it with ``max_sequence_length=16`` and ``_auto_resize=False``; 32x32 images give 8x8 = 64 tokens.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    torch.manual_seed(seed)
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    text_encoder, text_encoder_2 = tiny_clip_encoder(clip_tok), tiny_t5_encoder(t5_tok)
    vae = _tiny_flux_vae(latent_channels=4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def kontext_call_kwargs(steps: int = 2, size: int = 32) -> dict[str, Any]:
    """Call arguments that fit :func:`tiny_flux_kontext`."""
    return {
        "num_inference_steps": steps,
        "height": size,
        "width": size,
        "max_sequence_length": 16,
        "_auto_resize": False,
        "max_area": size * size,
    }


@needs("diffusers", "transformers")
def tiny_qwen_image_edit_plus(seed: int = 0, zero_cond_t: bool = False) -> Any:
    """A ``QwenImageEditPlusPipeline`` with a tiny VAE and transformer and *no* text encoder.

    Building a tiny Qwen2.5-VL (vision tower, processor) offline is out of scope here: call the pipeline
    with ``prompt_embeds`` / ``prompt_embeds_mask`` (and the negative ones) of width 16, see
    :func:`qwen_call_kwargs`. The pipeline resizes references to ``VAE_IMAGE_SIZE`` pixels (1024^2);
    tests shrink that module constant.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    ).eval()
    return QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=transformer,
    )


def qwen_call_kwargs(steps: int = 2, size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Call arguments that fit :func:`tiny_qwen_image_edit_plus` (random prompt embeddings, true CFG)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "num_inference_steps": steps,
        "height": size,
        "width": size,
        "true_cfg_scale": 2.0,
        "prompt_embeds": torch.randn(1, 6, 16, generator=g),
        "prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long),
        "negative_prompt_embeds": torch.randn(1, 5, 16, generator=g),
        "negative_prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long),
    }


@needs("diffusers", "transformers")
def tiny_qwen_image_edit_inpaint(seed: int = 0) -> Any:
    """A ``QwenImageEditInpaintPipeline`` with the components of :func:`tiny_qwen_image_edit_plus` (no text encoder).

    Call it with :func:`qwen_call_kwargs`, a ``mask_image`` and ``strength``; the pipeline sizes its output and
    the source image from ``calculate_dimensions(1024 * 1024, ratio)`` of its module, which tests shrink.
    """
    from diffusers import QwenImageEditInpaintPipeline

    return QwenImageEditInpaintPipeline(**tiny_qwen_image_edit_plus(seed=seed).components)


class QwenVLImageProcessorHolder:
    """What ``LongCatImageEditPipeline`` reads of its ``Qwen2VLProcessor``: ``image_processor`` alone.

    A real ``Qwen2VLProcessor`` cannot be built without torchvision in transformers 5 (its video processor
    check needs it); the pipeline only uses the processor's image processor.
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor


@needs("transformers")
def tiny_qwen_vl_tokenizer() -> Any:
    """:func:`tiny_qwen_tokenizer` plus Qwen2-VL's vision tokens as single special tokens."""
    tok = tiny_qwen_tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    return tok


@needs("transformers")
def tiny_qwen25_vl(tokenizer: Any, hidden: int = 16, layers: int = 1) -> Any:
    """A ``Qwen2_5_VLForConditionalGeneration`` of ``layers`` text layers (width ``hidden``, one vision block) for
    :func:`tiny_qwen_vl_tokenizer`'s vocabulary; its vision tower takes 14 px patches, merged 2x2."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(f"<|{t}|>") for t in ("vision_start", "vision_end", "image_pad",
                                                                     "video_pad")}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 2048, "bos_token_id": None, "eos_token_id": None,
                     "rope_theta": 10000.0,  # the older rope_scaling spelling: transformers 5 reads it too
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, hidden // 4 - 2]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": hidden, "fullatt_block_indexes": [0]},
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@needs("diffusers", "transformers")
def tiny_longcat_image_edit(seed: int = 0) -> Any:
    """A ``LongCatImageEditPipeline`` with a tiny Qwen2.5-VL text encoder, FLUX VAE and transformer.

    The pipeline sizes its output and the reference from ``calculate_dimensions(1024 * 1024, ratio)`` of its
    module, which tests shrink (32x32 gives 8x8 = 64 tokens per image); it pads every prompt to 512 tokens.
    """
    import transformers
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        LongCatImageEditPipeline,
        LongCatImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_vl_tokenizer()
    text_encoder = tiny_qwen25_vl(tokenizer)
    vae = _tiny_flux_vae(latent_channels=16)  # the pipeline packs 16 latent channels
    transformer = LongCatImageTransformer2DModel(
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=[4, 6, 6],
    ).eval()
    image_processor = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return LongCatImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_processor=QwenVLImageProcessorHolder(image_processor()),
        transformer=transformer,
    )
