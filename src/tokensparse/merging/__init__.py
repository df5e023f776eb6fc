"""Token merging (ToMe) with an adaptive threshold and matchings cached across steps (CA-ToMe).

Pure primitives, no model knowledge; ``integrations/merging_hooks.py`` wires them into models.

One *matching* turns ``N`` tokens laid out on an ``h x w`` grid into ``M = N - r`` tokens:

1. **Destinations**: one random token per 2x2 cell (tokens outside whole cells are destinations too, so
   they are never merged); every other token is a *source*.
2. **Bipartite soft matching**: each source picks its most cosine-similar destination. ``TokenMergingConfig``
   (what the hooks use) takes the similarity after subtracting the sequence's mean token (``center=True``):
   a DiT's hidden states share a large common component that makes raw cosines ~1 for most pairs in some
   layers (an adaptive threshold then merges almost everything there); centred, they are comparable across
   layers. The functions below take ``center=`` and default to the raw cosine of ToMe / tomesd.
3. **Merge** the ``r`` sources with the highest similarity into their destinations (size-weighted average);
   ``r = int(ratio * N)`` (ToMe), or, in *adaptive* mode, the number of sources whose best similarity is at
   least ``threshold`` (CA-ToMe).
4. After the layer, **unmerge** by copying each merged token's output back to every token it absorbed.

A :class:`Matching` stores this as index tensors: ``keep`` (the original positions that survive, ascending, so
the merged sequence keeps the original order) and ``index`` (where each original token went). Merging is one
``index_add`` of every token into its slot (then a division by the slot's size); unmerging is one
``index_select`` — over the flattened batch, which on CPU is ~10x faster than per-row gather/scatter.

Batches: all samples of a batch must keep the same number of tokens (tensors stay rectangular). In adaptive
mode each sample's count is ``#{sources with best similarity >= threshold}`` and the batch merges the
**minimum** of those counts, each sample its own most similar sources. This never merges a pair below the
threshold (quality is at least that of per-sample thresholds), at the price of merging less in a batch whose
samples disagree. Destinations are shared by the batch.

:class:`MatchCache` keeps one matching per layer for one generation and decides when to recompute it.

Modules: :mod:`.config` (:class:`TokenMergingConfig`), :mod:`.matching` (:class:`Matching`: merge / unmerge by
index), :mod:`.bipartite` (destinations and the bipartite soft matching), :mod:`.cache` (:class:`MatchCache`).
Every name is importable from here.
"""

from __future__ import annotations

from .bipartite import (  # noqa: F401  (destination_positions, match_positions: importable from here as before)
    bipartite_soft_matching,
    destination_positions,
    match,
    match_positions,
    num_sources,
    random_destinations,
)
from .cache import MAX_PASSES, MatchCache  # noqa: F401  (MAX_PASSES: importable from here as before)
from .config import TokenMergingConfig
from .matching import Matching, concat_matchings

__all__ = [
    "MatchCache",
    "Matching",
    "TokenMergingConfig",
    "bipartite_soft_matching",
    "concat_matchings",
    "match",
    "num_sources",
    "random_destinations",
]
