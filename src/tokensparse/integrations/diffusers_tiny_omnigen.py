"""A tiny random-weight ``OmniGenPipeline`` for tests, built offline (nothing is downloaded).

Tokenizer: a lower-cased word-level one (:func:`tiny_word_tokenizer`), so the pipeline's long default negative
prompt is about as many tokens as with OmniGen's own tokenizer (~130 with its instruction template). VAE: an
``AutoencoderKL`` with three downsamples (8 pixels per latent cell, as OmniGen's processor assumes: 16 pixels per
token with the transformer's 2x2 patches). The pipeline's processor needs ``torchvision`` (its transforms).
"""

from __future__ import annotations

from typing import Any

import torch

from ..extras import needs

WORDS = ("a an the cat dog red blue green in on of and with image photo generate according to following instructions "
         "user assistant end diffusion img")


@needs("transformers")
def tiny_word_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over :data:`WORDS` (lower-cased; words and runs of punctuation are tokens,
    anything else ``<unk>``): ``<unk>`` 0, ``<s>`` 1 (never emitted), ``<pad>`` 2, as OmniGen's collator pads."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "<pad>": 2}
    for word in WORDS.split():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<pad>")


@needs("diffusers", "transformers")
def tiny_omnigen(seed: int = 0) -> Any:
    """An ``OmniGenPipeline`` with the word tokenizer, a tiny VAE (/8) and a 2-layer OmniGen transformer.

    An ``H x W`` image (multiples of 16 pixels, at most 512) is an ``H/16 x W/16`` grid of tokens: 256x256 is
    256 tokens. ``ImportError`` without ``torchvision`` (diffusers then leaves the pipeline's processor out).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel
    from diffusers.pipelines.omnigen import pipeline_omnigen

    if not hasattr(pipeline_omnigen, "OmniGenMultiModalProcessor"):
        raise ImportError("OmniGenPipeline needs torchvision (its processor's transforms): pip install torchvision")
    torch.manual_seed(seed)
    tokenizer = tiny_word_tokenizer()
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=2, sample_size=64).eval()
    head_dim = 16
    transformer = OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_layers=2, pad_token_id=2, vocab_size=len(tokenizer), time_step_dim=16,
        rope_scaling={"short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0] * (head_dim // 2)},
        pos_embed_max_size=32).eval()
    return OmniGenPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                           tokenizer=tokenizer)
