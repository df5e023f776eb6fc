"""A fixed word vocabulary and tokenizer for RefDiT prompts.

Prompts are short lowercase word sequences. Id 0 is padding, so an empty prompt (the null condition)
tokenizes to an all-padding row. Words are only ever *appended* to ``WORDS``: ids of shipped
checkpoints must not move.
"""

from __future__ import annotations

import torch

from . import checks

PAD_ID = 0
MAX_PROMPT_LEN = 16
VOCAB_SLOTS = 256  # embedding rows reserved in RefDiT; len(WORDS) + 1 must stay below this

WORDS: tuple[str, ...] = (
    # tasks
    "recolor", "remove", "denoise", "deblur", "relight", "place", "compose", "scene",
    # colours
    "red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "gray", "orange", "purple", "brown",
    # layout
    "top", "bottom", "left", "right", "center", "small", "medium", "large", "at", "and", "on", "the", "of",
    "first", "second", "third", "fourth", "object", "subject", "background",
    # scenes / light
    "bright", "dark", "warm", "cool", "sky", "grass", "sand", "wall", "stripes", "dots", "gradient", "plain",
)

_WORD_TO_ID: dict[str, int] = {w: i + 1 for i, w in enumerate(WORDS)}
assert len(_WORD_TO_ID) == len(WORDS), "duplicate word in WORDS"
assert len(WORDS) + 1 <= VOCAB_SLOTS


def tokenize(prompt: str | list[str], max_len: int = MAX_PROMPT_LEN) -> torch.Tensor:
    """Map a prompt (or a list of prompts) to a ``(B, max_len)`` int64 tensor of word ids, 0-padded.

    Raises ``ValueError`` naming the first word not in the vocabulary, or a prompt longer than ``max_len``.
    """
    if not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    max_len = checks.integer("max_len", max_len, lo=1)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    out = torch.zeros(len(prompts), max_len, dtype=torch.long)
    for row, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        words = text.lower().split()
        if len(words) > max_len:
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise ValueError(f"prompt has {len(words)} words; at most {max_len} are supported: {shown!r}")
        for col, word in enumerate(words):
            if word not in _WORD_TO_ID:
                raise ValueError(f"prompt word {word!r} is not in the vocabulary (see tokensparse.vocab.WORDS)")
            out[row, col] = _WORD_TO_ID[word]
    return out


def detokenize(ids: torch.Tensor) -> list[str]:
    """Inverse of :func:`tokenize` for a ``(B, L)`` id tensor (padding dropped); ``ValueError`` for another shape
    or an id that names no word."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"detokenize expects a (B, L) tensor of word ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dim() != 2:
        raise ValueError(f"detokenize expects a (B, L) integer tensor of word ids, got shape {tuple(ids.shape)}, "
                         f"dtype {ids.dtype}")
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) <= len(WORDS):
        raise ValueError(f"word ids must be in [0, {len(WORDS)}], got [{int(ids.min())}, {int(ids.max())}]")
    return [" ".join(WORDS[i - 1] for i in row.tolist() if i != PAD_ID) for row in ids]
