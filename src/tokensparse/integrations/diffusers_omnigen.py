"""OmniGen (``OmniGenTransformer2DModel``, ``OmniGenPipeline``): its input images' tokens, thinned row by row.

``OmniGenPipeline`` writes ``<img><|image_k|></img>`` placeholders into the prompt; its processor replaces each
with as many placeholder ids as image ``k`` has 2x2 latent patches and hands the transformer ``input_ids (B, S_txt)``,
the VAE latents ``input_img_latents`` (one ``(1, C, h, w)`` per placeholder, row by row) and ``input_image_sizes``
(``{row: [[start, end], ...]}``, where each image's patches go). The transformer embeds the text, patch-embeds every
image (a 2D sin-cos embedding of its own grid added) and writes it over its placeholder ids
(``_get_multimodal_embeddings``), then runs ``[text and images, time token, noisy target]`` (``S`` tokens) through
its blocks with a ``(B, S, S)`` 0/1 ``attention_mask`` (causal text, bidirectional within an image, left padding
masked) and 1D RoPE from ``position_ids``. The batch is ``[conditional, unconditional, image-guidance]`` rows,
whose images sit at different places; its RoPE is computed from ``position_ids[0]`` alone, so every row's token
``i`` has row 0's position ``i`` (diffusers 0.42).

The thinned call keeps, in every row, the tokens its target depends on (through the mask) except the dropped image
tokens, left-padded to the longest row (pads masked out, as the pipeline pads):

- :class:`KeptRows` stands in for ``_get_multimodal_embeddings`` on the instance: the dense embeddings, gathered;
- ``position_ids`` and ``attention_mask`` are gathered the same way (the pads' columns masked);
- :class:`RowRope` wraps every block's attention processor: in a thinned call it runs the processor row by row,
  each row with the dense RoPE rows of its own tokens (rows keep different tokens, and the transformer's RoPE is
  one set of rows for the batch).

So every kept token keeps its embedding, its dense position and its mask entries; the output is the target, as
dense. The references are the first image row's images; every other row's image gets the selection of the one with
its pixels (captured from the pipeline; else, and for an image none of them is, the one at its place).
``proportional=True``: :meth:`OmniGenAdapter.with_bias` hands the transformer that mask made additive, with
``log(size)`` on each row's columns of its kept image tokens. Registered in :mod:`.diffusers_models`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .diffusers_layout import InContextAdapter, RefLayout
from .merging_blocks import active_merge
from .merging_spans import keep_rows

ATTR = "_get_multimodal_embeddings"
logger = logging.getLogger(__name__)


@dataclass
class OmniLayout(RefLayout):
    """:class:`RefLayout` of the first image row's images, plus ``sources``: per image row, which reference each of
    its images is (the one with its pixels; -1: none), where the pipeline's images were captured, else ``None``."""

    sources: dict[int, list[int]] | None = None


@dataclass
class Rows:
    """A thinned call, per row: the dense sequence position of each slot ``gather (B, S')`` (pads: 0) and which
    slots are pads ``pad (B, S')``; the first ``n_text`` slots are text and images, then the time token and the
    target; ``rope``: each slot's dense RoPE rows ``(cos, sin)``, ``(B, S', D)`` each; ``kept (B, S')``: which of the
    selection's kept reference tokens (its place in ``index``) each slot holds, -1 for other tokens."""

    gather: Tensor
    pad: Tensor
    n_text: int
    rope: tuple[Tensor, Tensor]
    kept: Tensor


class KeptRows:
    """``transformer._get_multimodal_embeddings`` (an instance attribute) that, in a thinned call (``state.call`` a
    :class:`Rows`), returns the dense text-and-image embeddings gathered to the kept slots; else unchanged. Also
    its own removal handle."""

    def __init__(self, transformer: torch.nn.Module, state: Any) -> None:
        self.transformer, self.state = transformer, state

    def __call__(self, input_ids: Tensor | None, input_img_latents: list[Tensor], input_image_sizes: dict
                 ) -> Tensor | None:
        out = type(self.transformer)._get_multimodal_embeddings(
            self.transformer, input_ids, input_img_latents, input_image_sizes)
        rows = self.state.call
        if out is None or not isinstance(rows, Rows):
            return out
        index = rows.gather[:, :rows.n_text].to(out.device)
        return out.gather(1, index[..., None].expand(-1, -1, out.shape[-1]))

    def remove(self) -> None:
        if self.transformer.__dict__.get(ATTR) is self:
            del self.transformer.__dict__[ATTR]


class RowRope:
    """An OmniGen block's attention processor, wrapped: in a thinned call (``state.call`` a :class:`Rows`) it runs
    the wrapped processor once per row, with that row's RoPE rows and mask (where token merging merged the call's
    target tokens, the rows of the tokens it kept); otherwise it is the wrapped processor."""

    def __init__(self, processor: Any, state: Any) -> None:
        self.processor, self.state = processor, state
        self.takes_rope = "image_rotary_emb" in inspect.signature(processor.__call__).parameters

    def __call__(self, attn: torch.nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None) -> Tensor:
        inputs = (hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        rows = self.state.replay.current(self.state.call, attn, inputs, {})  # its forward's, when recomputed
        if not isinstance(rows, Rows):
            extra = {"image_rotary_emb": image_rotary_emb} if self.takes_rope else {}
            return self.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                  attention_mask=attention_mask, **extra)
        if not self.takes_rope:
            raise TypeError(f"{type(self.processor).__name__} takes no image_rotary_emb: Sparse Context on OmniGen "
                            "hands every row its own RoPE rows through it")
        cos, sin = rows.rope
        merged = active_merge(attn)  # token merging's, on this call: its kept target tokens' rows
        out = []
        for r in range(hidden_states.shape[0]):
            one = slice(r, r + 1)
            mask = attention_mask if attention_mask is None or attention_mask.shape[0] == 1 else attention_mask[one]
            rope = (cos[r], sin[r]) if merged is None else tuple(keep_rows(t[r], *merged, r) for t in (cos, sin))
            out.append(self.processor(
                attn, hidden_states[one], attention_mask=mask, image_rotary_emb=rope,
                encoder_hidden_states=None if encoder_hidden_states is None else encoder_hidden_states[one]))
        return torch.cat(out)


class RowRopeProcessors:
    """:class:`RowRope` around every block's attention processor of ``transformer`` (:meth:`ensure`: also around a
    processor set after it); :meth:`remove` puts the wrapped ones back."""

    def __init__(self, transformer: torch.nn.Module, state: Any) -> None:
        self.transformer, self.state = transformer, state
        self.ensure()

    def _attentions(self) -> list[torch.nn.Module]:
        return [block.self_attn for block in self.transformer.layers]

    def ensure(self) -> None:
        for attn in self._attentions():
            processor = attn.processor
            while isinstance(processor, RowRope) and processor.state is not self.state:  # another hook's: unwrap
                processor = processor.processor
            if isinstance(processor, torch.nn.Module):
                raise TypeError(f"Sparse Context on OmniGen wraps the attention processors; {type(processor).__name__} "
                                "is a module (it has weights), which it cannot wrap")
            if not isinstance(processor, RowRope):
                processor = RowRope(processor, self.state)
            if processor is not attn.processor:
                attn.set_processor(processor)

    def remove(self) -> None:
        for attn in self._attentions():
            if isinstance(attn.processor, RowRope) and attn.processor.state is self.state:
                attn.set_processor(attn.processor.processor)


def _patches(latent: Tensor, p: int) -> Tensor:
    """A ``(1, C, h, w)`` latent as the transformer patch-embeds it: ``(h/p * w/p, C p p)``, row-major."""
    c, h, w = latent.shape[-3:]
    x = latent[:1].reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)
    return x.reshape((h // p) * (w // p), c * p * p)


def needed(mask: Tensor | None, drop: Tensor, n_target: int) -> Tensor:
    """``(B, S)``: per row, the tokens its last ``1 + n_target`` (the time token and the target) depend on through
    ``mask`` (``(B or 1, S, S)``, nonzero: attends), the ``drop`` ``(B, S)`` tokens and what only they attend to
    left out; without a mask every token but the dropped ones."""
    if mask is None:
        return ~drop
    b, n = drop.shape
    attend = mask.expand(b, n, n)
    if not attend.is_floating_point():
        attend = attend.float()
    need = torch.zeros_like(drop)
    need[:, n - 1 - n_target:] = True
    while True:  # what the needed tokens attend to is needed (the pipeline's masks: two rounds)
        live = (need & ~drop).to(attend.dtype)
        grown = need | ((torch.bmm(live[:, None], attend)[:, 0] != 0) & ~drop)
        if torch.equal(grown, need):
            return need & ~drop
        need = grown


class OmniGenAdapter(InContextAdapter):
    """OmniGen: the references are the images of the call's first image row (the first prompt's conditional row),
    in its placeholders' order. The batch shares their selection: through the pipeline, every other row's image gets
    the selection of the reference with its pixels (a prompt may place the images in any order, or once each; the
    image-guidance row lists them ``1, 2, ...``); an image none of them is (another prompt's own), or any image on
    the bare transformer, gets the selection of the reference at its place, which must be of its size (a warning
    where the images differ). The selection is scored with the first prompt (its conditional row): ``selector="auto"``
    picks its scorer by that prompt's task for every prompt of the batch (other prompts cannot reach it: they share
    the selection), with a warning once where the prompts differ, as on the other pipelines whose batch shares one.

    A thinned call (:meth:`subset`) keeps per row what its target depends on, minus the dropped tokens, with
    their dense embeddings (:class:`KeptRows`), position ids, mask entries and RoPE rows (:class:`RowRope`); the
    output is the target's, so there is nothing to scatter back.
    """

    def __init__(self) -> None:
        self.transformer: Any = None
        self.state: Any = None
        self.processors: RowRopeProcessors | None = None
        self.patch = 2

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        """Put :class:`KeptRows` and the :class:`RowRope` processors on ``transformer`` (their handles)."""
        if not callable(getattr(type(transformer), ATTR, None)):
            raise TypeError(f"{type(transformer).__name__} has no {ATTR} (a diffusers version tokensparse does not "
                            "know)")
        self.transformer, self.patch, self.state = transformer, int(transformer.config.patch_size), state
        kept = KeptRows(transformer, state)
        transformer.__dict__[ATTR] = kept
        self.processors = RowRopeProcessors(transformer, state)
        return [kept, self.processors]

    @staticmethod
    def _images(kwargs: dict[str, Any]) -> list[tuple[int, list[tuple[int, int]], list[Tensor]]] | None:
        """Per row with images, in the order the transformer places them: ``(row, [(start, end)], latents)``."""
        sizes = kwargs.get("input_image_sizes")
        if kwargs.get("input_ids") is None or not sizes:
            return None
        latents = list(kwargs.get("input_img_latents") or [])
        out, used = [], 0
        for row, spans in sizes.items():
            out.append((int(row), [(int(s), int(e)) for s, e in spans], latents[used:used + len(spans)]))
            used += len(spans)
        if used != len(latents):
            raise ValueError(f"input_image_sizes places {used} images but input_img_latents holds {len(latents)}")
        return out

    def _grids(self, latents: list[Tensor]) -> list[tuple[int, int]]:
        return [(x.shape[-2] // self.patch, x.shape[-1] // self.patch) for x in latents]

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """The first image row's latent patches ``(1, N_refs, C p p)``, its images in order."""
        images = self._images(kwargs)
        if images is None:
            return torch.zeros(1, 0, 1)
        return torch.cat([_patches(x, self.patch) for x in images[0][2]])[None]

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        """The first image row's images, one after the other (the sequence :meth:`tokens` gives)."""
        images = self._images(kwargs)
        if images is None:
            return None
        _, spans, latents = images[0]
        device = latents[0].device
        positions, cells, start = [], [], 0
        grids = self._grids(latents)
        for (h, w), (s, e) in zip(grids, spans):
            if e - s != h * w:
                raise ValueError(f"input_image_sizes gives an image {e - s} placeholders, its latent {h}x{w} patches")
            positions.append(torch.arange(start, start + h * w, device=device))
            cells.append(torch.arange(h * w, device=device))
            start += h * w
        sources = self._sources(images)
        if sources and any(-1 in found for found in sources.values()) and not self.state.warned_batch:
            logger.warning("tokensparse: the prompts of this batch place different images; an image the first prompt "
                           "does not place uses the selection of the first prompt's image at its place")
            self.state.warned_batch = True
        return OmniLayout(start, positions, cells, grids, sources)

    def _sources(self, images: list[tuple[int, list[tuple[int, int]], list[Tensor]]]) -> dict[int, list[int]] | None:
        """Per image row, which of the first row's images (the references) each of its images is: the first with
        its pixels (the pipeline's, captured for this call), -1 for none; ``None`` where they were not captured."""
        state = self.state
        pixels = state.images if state is not None and state.images and state.images_tick == state.forwards else None
        if pixels is None or len(pixels) != sum(len(spans) for _, spans, _ in images) or any(
                x is None for x in pixels):
            return None
        refs = pixels[:len(images[0][1])]
        sources, used = {images[0][0]: list(range(len(refs)))}, len(refs)
        for row, spans, _ in images[1:]:
            sources[row] = [next((k for k, ref in enumerate(refs) if ref.shape == x.shape and torch.equal(ref, x)), -1)
                            for x in pixels[used:used + len(spans)]]
            used += len(spans)
        return sources

    def _kept(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, shape: tuple[int, int]) -> Tensor:
        """``(B, S)``: for every row's image tokens, which kept reference token each is (its place in ``index``; each
        image: its source reference's cells, else the reference at its place), -2 for a dropped one; -1 for the
        other tokens."""
        ordinal = torch.full((layout.n,), -2, dtype=torch.long, device=index.device)
        ordinal[index] = torch.arange(index.numel(), device=index.device)
        refs = [ordinal[pos.to(index.device)] for pos in layout.positions]
        kept = torch.full(shape, -1, dtype=torch.long, device=index.device)
        sources = getattr(layout, "sources", None) or {}
        for row, spans, latents in self._images(kwargs) or []:
            found = sources.get(row)
            for j, ((start, end), grid) in enumerate(zip(spans, self._grids(latents))):
                k = found[j] if found is not None and found[j] >= 0 else j
                if k >= len(refs) or layout.grids[k] != grid:
                    at = f"{layout.grids[k][0]}x{layout.grids[k][1]}" if k < len(refs) else "none"
                    raise ValueError(
                        f"Sparse Context on OmniGen gives every image the selection of the first prompt's image it is "
                        f"(the batch shares one selection): row {row}'s image {j + 1} ({grid[0]}x{grid[1]} patches) is "
                        f"none of them, and the first prompt's image at its place is {at}; every prompt must place "
                        "the first prompt's images, or others of the same sizes in their places")
                kept[row, start:end] = refs[k]
        return kept

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        hs, ids = kwargs["hidden_states"], kwargs["input_ids"]
        b, n_text = ids.shape
        n_target = (hs.shape[-2] // self.patch) * (hs.shape[-1] // self.patch)
        n = n_text + 1 + n_target
        pos = kwargs["position_ids"].reshape(-1, n).expand(b, n)
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 3 or tuple(mask.shape[1:]) != (n, n)):
            raise ValueError(f"attention_mask must be the pipeline's (batch, {n}, {n}) 0/1 mask over text, images, "
                             f"time token and target, got {tuple(mask.shape)}")
        kept = self._kept(kwargs, index, layout, (b, n)).to(pos.device)
        drop = kept == -2
        need = needed(None if mask is None else mask.to(pos.device), drop, n_target)
        counts = need.sum(1)
        width = int(counts.max())
        gather = torch.zeros(b, width, dtype=torch.long, device=pos.device)
        for r in range(b):  # each row's kept tokens in order, left-padded (as the pipeline pads)
            gather[r, width - int(counts[r]):] = torch.nonzero(need[r]).squeeze(1)
        pad = torch.arange(width, device=pos.device)[None] < (width - counts)[:, None]
        if mask is None:
            mask = torch.ones(b, n, n, device=pos.device)
        kept_mask = mask.expand(b, n, n).gather(1, gather[:, :, None].expand(b, width, n).to(mask.device))
        kept_mask = kept_mask.gather(2, gather[:, None, :].expand(b, width, width).to(mask.device))
        kept_mask = kept_mask.masked_fill(pad[:, :, None].to(mask.device), 1).masked_fill(
            pad[:, None, :].to(mask.device), 0)  # pads attend (as the pipeline's do); nothing attends to a pad
        cos, sin = self.transformer.rope(hs, pos)  # the dense call's RoPE rows (from position_ids[0])
        rows = gather.to(cos.device)
        state.call = Rows(gather, pad, width - 1 - n_target, (cos[rows], sin[rows]),
                          kept.gather(1, gather).masked_fill(pad, -1))
        self.processors.ensure()  # a processor set since apply gets its RowRope too
        return {**kwargs, "position_ids": pos.gather(1, gather).masked_fill(pad, 0), "attention_mask": kept_mask}

    def with_bias(self, call: dict[str, Any], bias: Tensor) -> dict[str, Any]:
        """The thinned call with its 0/1 mask made the additive one the transformer would make of it (``(1 - m)``
        times the dtype's minimum), plus ``bias`` (``log(size)`` per kept reference token) on each row's columns
        of its kept image tokens: a ``(B, 1, S', S')`` mask, which the transformer passes on as it is."""
        rows, mask = self.state.call, call["attention_mask"]
        dtype = self.transformer.dtype
        additive = (1 - mask.float()) * torch.finfo(dtype).min
        slots = rows.kept.to(mask.device)
        columns = torch.where(slots >= 0, bias.to(mask.device).float()[slots.clamp(min=0)], 0.0)
        return {**call, "attention_mask": (additive + columns[:, None, :]).to(dtype)[:, None]}

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        return output  # the target's prediction alone, as dense

    def call_inputs(self, state: Any, kwargs: dict[str, Any]) -> tuple[list | None, list | None, bool]:
        """The pipeline captured every row's image pixels (``encode_input_images``): the references are the first
        ones; and the prompts (``check_inputs``): the first (the batch shares its selection)."""
        images = self._images(kwargs)
        k = len(images[0][1]) if images else 0
        pixels = state.images[:k] if state.images and state.images_tick == state.forwards else None
        if pixels is not None and (len(pixels) < k or any(x is None for x in pixels)):
            pixels = None
        prompts = state.prompts[:1] if state.prompts and state.prompts_tick == state.forwards else None
        return pixels, prompts, state.forwards in (state.images_tick, state.prompts_tick)
