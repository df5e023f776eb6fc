"""``selector="auto"``: pick a scorer per sample from the task family its prompt names.

Families (as in :mod:`tokensparse.data`): ``editing`` (the target is the reference, changed in place),
``subject`` (a subject from the reference goes somewhere new) and ``multi`` (several references
composed). Which scorer serves which family best was measured (``benchmarks/selection.py``) and is
encoded in :data:`FAMILY_SCORER`. A prompt with no known verb falls back to an image rule: a
reference with a plain border (a subject on a background) uses ``foreground``, any other (a photo, a
scene) uses the editing scorer.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .scorers import SCORERS, RefView, border_background, register_scorer

# Verbs and phrases that name a family (RefDiT's vocabulary first, common editing words after).
FAMILY_WORDS: dict[str, tuple[str, ...]] = {
    "editing": ("recolor", "remove", "relight", "denoise", "deblur", "erase", "delete", "change", "make",
                "turn", "replace", "edit", "fix", "restore", "colorize"),
    "subject": ("place", "background", "put", "show", "subject"),
    "multi": ("compose", "combine", "together"),
}
# Measured on the held-out suite (benchmarks/selection.py, keep 0.25): on editing, spatial coverage wins
# ("uniform" +0.85 dB over random; structure-seeking "edges" -0.7 dB, "detail" in between): a pixel-aligned
# copy must rebuild every region from nearby kept tokens. On subject and multi, "foreground" (the subject's
# tokens; a scene photo among subject references is scored like an edit) was best.
FAMILY_SCORER: dict[str, str] = {"editing": "uniform", "subject": "foreground", "multi": "foreground"}
PLAIN_BORDER_REL = 0.1  # border spread / image spread below this: the border is "plain"


def prompt_family(prompt: str | None) -> str | None:
    """The task family a prompt names (first matching word wins, in prompt order), or ``None``.

    Words are the prompt's runs of letters, so punctuation around one does not hide it (``"Recolor."``,
    ``'"compose" them'``)."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
    if not prompt:
        return None
    for word in re.findall(r"[a-z]+", prompt.lower()):
        for fam in ("multi", "subject", "editing"):
            if word in FAMILY_WORDS[fam]:
                return fam
    return None


def plain_border(features: Tensor) -> Tensor:
    """``(B,)`` bool: the border tokens are (nearly) one colour relative to the whole reference's spread.

    True for a subject on a plain background, False for a photo or a scene. Scale-free (pixels or latents).
    """
    b, h, w, c = features.shape
    f = features.float()
    if h > 1 and w > 1:
        border = torch.cat([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], 1)
    else:
        border = f.reshape(b, -1, c)
    spread = (border - border_background(f)[:, None]).pow(2).mean(-1).sqrt().median(1).values  # (B,)
    whole = f.reshape(b, -1, c).var(1, correction=0).mean(-1).sqrt()  # (B,)
    return spread <= PLAIN_BORDER_REL * whole


def auto_choice(view: RefView) -> list[str]:
    """The scorer ``auto`` uses for each sample of ``view``."""
    plain = plain_border(view.features).tolist()
    out = []
    for i in range(view.batch):
        fam = prompt_family(view.prompts[i] if view.prompts is not None and i < len(view.prompts) else None)
        if fam == "editing":
            out.append(FAMILY_SCORER["editing"])
        elif fam is None:  # unknown task: judge by the reference itself
            out.append(FAMILY_SCORER["subject"] if plain[i] else FAMILY_SCORER["editing"])
        elif fam == "multi" and not plain[i]:  # a scene among subjects: it is copied, like an edit
            out.append(FAMILY_SCORER["editing"])
        else:
            out.append(FAMILY_SCORER[fam])
    return out


@register_scorer("auto", informed=True, probe=True)  # probes only if a family maps to "attention"
def score_auto(view: RefView, generator: torch.Generator) -> Tensor:
    """Per sample, the scorer measured best for the family its prompt names (see :data:`FAMILY_SCORER`).

    Its scores are those of the picked scorer: on an edit ``uniform``'s, ranks that carry no content (not zero on
    empty tokens), so an adaptive budget keeps a fixed fraction of an edited reference (44 of 64 tokens at mass
    0.9)."""
    choice = auto_choice(view)
    out = None
    for name in sorted(set(choice)):
        scores = SCORERS[name](view, generator)
        rows = torch.tensor([c == name for c in choice], device=scores.device)
        out = scores if out is None else torch.where(rows[:, None], scores, out)
    return out
