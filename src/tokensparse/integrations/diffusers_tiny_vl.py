"""A tiny random-weight Qwen3-VL text encoder and its processor, built offline, for the tiny JoyImage Edit (and
Edit Plus), Fibo 2.0 and Qwen-Image 2.1 pipelines (each encodes the prompt with the images through
``Qwen3VLForConditionalGeneration``).

The tokenizer is :func:`~.diffusers_tiny.tiny_qwen_vl_tokenizer` (one token per byte, the vision tokens special);
the image processor is the PIL ``Qwen2VLImageProcessor`` with Qwen3-VL's 16 px patches, merged 2x2 (one
``<|image_pad|>`` per 32x32 pixels), up to 512x512 pixels per image (Qwen-Image 2.1 needs every image at the
size it gave it: one slot per 2x2 latent tokens).
"""

from __future__ import annotations

from typing import Any

from ..extras import needs
from .diffusers_tiny import tiny_qwen_vl_tokenizer

# renders a message's content given as a string or as a list of {"type": "text", "text": ...} parts (Qwen-Image
# 2.1 tokenizes its system message that way to count the tokens it drops)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@needs("transformers")
def tiny_qwen3_vl_processor() -> Any:
    """A ``Qwen3VLProcessor`` without a video processor.

    transformers 5 checks each processor part's class, and the video processor's base class needs torchvision;
    none of the pipelines passes videos, so the processor is built without one (a subclass skips that one check).
    """
    import transformers
    from transformers import Qwen3VLProcessor

    class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    image_processor = image_processor_cls(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                          max_pixels=512 * 512)
    return Qwen3VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tiny_qwen_vl_tokenizer(),
                                     video_processor=None, chat_template=CHAT_TEMPLATE)


@needs("transformers")
def tiny_qwen3_vl(processor: Any, layers: int = 2, hidden: int = 16) -> Any:
    """A ``Qwen3VLForConditionalGeneration`` of ``layers`` text layers of width ``hidden`` and one vision block,
    for ``processor``'s vocabulary (:func:`tiny_qwen3_vl_processor`)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(f"<|{t}|>") for t in ("vision_start", "vision_end", "image_pad", "video_pad")}
    head = 8
    config = Qwen3VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": hidden // head, "num_key_value_heads": 1,
                     "head_dim": head, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": hidden, "deepstack_visual_indexes": [0], "num_position_embeddings": 64},
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )
    return Qwen3VLForConditionalGeneration(config).eval()


@needs("transformers")
def tiny_qwen3_vl_with_processor(layers: int, hidden: int = 16) -> tuple[Any, Any]:
    """``(processor, text_encoder)``: :func:`tiny_qwen3_vl_processor` and a :func:`tiny_qwen3_vl` of ``layers`` text
    layers of width ``hidden`` for it (its weights drawn from the global generator, as the pipeline's other parts)."""
    processor = tiny_qwen3_vl_processor()
    return processor, tiny_qwen3_vl(processor, layers=layers, hidden=hidden)
