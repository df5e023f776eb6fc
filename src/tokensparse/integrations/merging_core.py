"""Token merging's per-model state: :class:`TokenMergingState` (config, step counter, match cache, each layer's
destinations, hook handles) and the hooks on the model's calls that feed it (:func:`observe_calls`). No targets here.

The per-block hooks, :class:`~.merging_blocks.BlockMerger`, merge a sublayer's target grid and unmerge its output;
they act only inside a call of the merged model (or the backward recomputation of one): a module it shares with
another model -- Z-Image's ControlNet runs the transformer's own noise-refiner blocks -- runs unmerged in that
model's calls. Targets are wired in :mod:`.merging_hooks` (RefDiT) and :mod:`.merging_diffusers` (diffusers UNets
and transformers).

Beside it, and importable from here as before: the per-block hooks in :mod:`.merging_blocks`; call fingerprints and
what gradient checkpointing's recomputations need in :mod:`.fingerprints`; merging a span of tokens and thinning
attention masks in :mod:`.merging_spans`; the diffusers hooks merging refuses in :mod:`.merging_conflicts`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..generation import StepTracker, check_scheduler, copy_keeping_copied_owners, state_without_pipelines
from ..merging import (
    Matching,
    TokenMergingConfig,
    concat_matchings,
    destination_positions,
    match_positions,
    num_sources,
    random_destinations,
)
from .calls import as_keywords, first_arg
from .fingerprints import (  # noqa: F401  (MAX_RECORDED: importable from here as before)
    MAX_RECORDED,
    Recorded,
    _in_backward,
    call_key,
)
from .merging_blocks import BlockMerger, GridFn, RopeFn, Sublayer, merge_block  # noqa: F401  (importable as before)
from .merging_conflicts import GRID_HOOKS, refuse_output_caches  # noqa: F401  (GRID_HOOKS: importable as before)
from .merging_spans import (  # noqa: F401  (importable from here as before)
    SquareMasks,
    merge_key_mask,
    merge_query_key_mask,
    merge_span,
    part,
    unmerge_span,
)


@dataclass
class TokenMergingState:
    """What :func:`apply_token_merging` attached to a model: config, step counter, cache, hook handles."""

    cfg: TokenMergingConfig
    model: nn.Module
    owners: list[Any] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    # the modules whose calls merge (BlockMerger's sublayers) and every module inside them
    sublayers: list[nn.Module] = field(default_factory=list)
    tracker: StepTracker = field(default_factory=StepTracker)
    latent_hw: tuple[int, int] | None = None
    merged_tokens: int = 0  # tokens merged away in the last generation, summed over layers and calls
    grids_found: int = 0  # blocks of the current model call whose tokens formed a grid (>= 2x2) this config merges
    warned: bool = False
    warned_misfit: bool = False
    warned_mask: bool = False
    warned_video: bool = False

    def __deepcopy__(self, memo: dict) -> TokenMergingState:
        recorded, self._recorded = self._recorded, Recorded()  # only for a backward in flight on this model
        try:
            return copy_keeping_copied_owners(self, memo)  # owners[0], the model, is copied with the state's fields
        finally:
            self._recorded = recorded

    def __getstate__(self) -> dict:
        state = state_without_pipelines(self)
        state["_recorded"] = Recorded()  # only for a backward in flight in this process
        return state

    def __setstate__(self, state: dict) -> None:
        # defaults first: also older pickles
        self.__dict__.update({"recording": False, "isolated": False, "sublayers": [], "inference": None,
                              "kinds": set(), "_destinations": Destinations(), **state,
                              "square_masks": SquareMasks(), "_recorded": Recorded(),
                              "running": 0})

    def __post_init__(self) -> None:
        self.call: Hashable | None = None  # fingerprint of the running model call (see call_key)
        self.cache = self.cfg.make_cache()
        self._generation = self.tracker.generation
        self._recorded = Recorded()  # matchings for gradient checkpointing's recomputations, see matching()
        self.recording = False  # this model call may be recomputed in backward (gradient checkpointing)
        self.isolated = False  # the last call's samples were at different timesteps: the next starts afresh
        self.running = 0  # calls of the model in progress: its sublayers merge only inside one
        self.inference: bool | None = None  # whether the last call ran under torch.inference_mode()
        self.kinds: set[Hashable] = set()  # (grid, grad mode) of the calls of the current step, see observe
        self._destinations = Destinations()  # each layer's destination positions by step, see destinations()
        self.square_masks = SquareMasks()  # the running call's query x key mask, checked once; emptied as it ends

    @property
    def step(self) -> int:
        return max(self.tracker.step, 0)

    def new_generation(self) -> None:
        self.tracker.reset()

    def observe(self, t: Any, call: dict | None = None, grid: Hashable = None) -> None:
        """Record a model call (its timestep, ``None`` read as 0, and arguments); starts a fresh cache when a new
        generation begins.

        ``call``: the call's arguments by name; their fingerprint tells the passes of a step apart, so an
        identical call repeated at one timestep reuses its matchings (same output, bounded cache).
        ``grid``: the call's target grid (any hashable: ``(h, w)``, a latent's shape; ``None`` if unknown), what a
        generation keeps from step to step whatever else its calls change (thinned reference tokens, a K/V-extract
        call, the batch, which diffusers' dynamic CFG halves part-way).

        Steps: calls at one timestep are the passes of a step (guidance), a lower timestep is the next step, a
        higher one starts a new generation (:class:`~tokensparse.generation.StepTracker`). A call that cannot
        continue the current generation starts a new one as well:

        - a switch into or out of ``torch.inference_mode()`` (a training step after a generation run under it);
        - the first call of a new step whose grid and grad mode no call of the previous step had (another image
          size; a grad-enabled training step after a generation under ``no_grad``, or the reverse). Passes
          of one step may differ (SD3's skip-layer pass, Attend-and-Excite's grad-enabled passes before its CFG
          pass): a step whose first call is like one of the previous step's continues the generation.

        A call whose samples are at different timesteps (a training batch) is no step of one generation: it is a
        generation of its own (fresh matchings from its own tokens, whatever ``recompute_every`` says), and the
        call after it starts another one.
        """
        if _in_backward():  # the whole model checkpointed and recomputed: the forward already counted this call
            return
        for owner in self.owners[1:]:  # a pipeline whose scheduler was swapped after apply
            check_scheduler(owner)
        inference = torch.is_inference_mode_enabled()
        self.recording = (torch.is_grad_enabled() or self.model.training) and not inference and any(
            getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules())
        self.grids_found = 0
        self.call = None if call is None else call_key(call)
        mixed = False
        if isinstance(t, Tensor):
            flat = t.detach().flatten()
            mixed = flat.numel() > 1 and bool((flat != flat[0]).any())
            t = flat[0].item() if flat.numel() else None
        t = 0.0 if t is None else float(t)
        kind = (grid, torch.is_grad_enabled())
        if (mixed or self.isolated or (self.inference is not None and inference != self.inference)
                or (self.tracker.advances(t) and self.kinds and kind not in self.kinds)):
            self.tracker.reset()
        self.isolated, self.inference = mixed, inference
        step, generation = self.tracker.step, self.tracker.generation
        self.tracker.observe(t)
        if (self.tracker.step, self.tracker.generation) != (step, generation):  # a new step: its first call
            self.kinds = set()
        self.kinds.add(kind)
        if self.tracker.generation != self._generation:
            self._generation = self.tracker.generation
            self.cache.reset()
            self.merged_tokens = 0

    def destination_generator(self, layer: str) -> torch.Generator:
        """The generator of ``layer``'s random destinations at this step: seeded by ``cfg.seed``, the step and the
        layer's name only, so every pass of a step (CFG's conditional and unconditional calls, guidance branches)
        draws the same destinations for a layer, whichever passes run and in what order (as one batched call
        would): CFG at scale 1 is then exactly the unguided generation."""
        key = f"{self.cfg.seed}/{self.step}/{layer.removeprefix('_orig_mod.')}".encode()  # torch.compile: as unwrapped
        return torch.Generator().manual_seed(zlib.crc32(key) | (zlib.adler32(key) << 32))

    def destinations(self, layer: str, grid: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        """``(src_pos, dst_pos)`` of ``layer``'s random destinations on ``grid`` at this step (see
        :meth:`destination_generator`), on ``device``.

        They depend on nothing but the seed, the step, the layer and the grid, so they are kept (in
        :class:`Destinations`): every later generation with this config -- and every other pass of a step --
        draws the same ones, and seeding a generator, drawing and finding the positions (~15 ops) would be
        repeated for every layer at every step. Kept apart by inference mode: tensors made under
        ``torch.inference_mode()`` must not reach a grad-recording step."""
        key = (self.step, layer, grid, device, torch.is_inference_mode_enabled())
        positions = self._destinations.get(key)
        if positions is None:
            is_dst = random_destinations(grid[0], grid[1], self.destination_generator(layer))
            positions = destination_positions(is_dst.to(device))
            self._destinations.put(key, positions)
        return positions

    def matching(self, layer: str, x: Tensor, grid: tuple[int, int], shared: bool = False,
                 frames: int = 1) -> Matching:
        """The matching of ``layer`` for tokens ``x`` at this step (computed, or reused from the cache).

        shared: one matching for the whole batch, computed from the batch-mean metric (for models whose
        positional tables have no batch dimension, like FLUX's RoPE).
        frames: ``x`` holds this many ``grid`` grids one after another (the target layers of Qwen-Image-Layered): each
        is matched on its own, as one grid alone would be, and no token merges with another frame's
        (:func:`~tokensparse.merging.concat_matchings`).
        """
        cfg = self.cfg

        def match_grid(tokens: Tensor) -> Matching:
            n = tokens.shape[1]
            src_pos, dst_pos = self.destinations(layer, grid, tokens.device)
            n_src = num_sources(grid[0], grid[1])  # random_destinations' default cell
            metric = tokens.mean(0, keepdim=True) if shared else tokens
            if cfg.adaptive:
                return match_positions(metric, src_pos, dst_pos, threshold=cfg.threshold,
                                       cap=cfg.num_merged(n, n_src), center=cfg.center)
            return match_positions(metric, src_pos, dst_pos, num=cfg.num_merged(n, n_src), center=cfg.center)

        def compute() -> Matching:
            if frames == 1:
                m = match_grid(x)
            else:
                m = concat_matchings([match_grid(frame) for frame in x.chunk(frames, dim=1)])
            return m.expand(x.shape[0]) if shared else m

        # Gradient checkpointing re-runs a block inside backward, after later forwards may have moved the step
        # (or started a new generation): the re-run must get the matching its forward used. Forwards record
        # their matchings by layer and input; a re-run takes the newest one recorded for its input (backward
        # visits the forwards newest first).
        in_backward = _in_backward()
        if in_backward and self._recorded:
            m = self._recorded.pop((layer, call_key({"x": x})))
            if m is not None:
                return m
        m = self.cache.lookup(layer, self.step, x, compute, self.call)
        if not in_backward:
            self.merged_tokens += m.num_merged
            if self.recording:
                self._recorded.push((layer, call_key({"x": x})), m)
        return m


MAX_DESTINATION_TOKENS = 1 << 20
"""Positions :class:`Destinations` keeps (8 MiB of int64): every step and layer of a 16x16-token model, the
first few steps of a 64x64-token one."""


class Destinations:
    """Destination positions by (step, layer, grid, device, inference mode), kept for the life of a
    :class:`TokenMergingState` (they are a function of its seed and the key) up to :data:`MAX_DESTINATION_TOKENS`
    positions; once full it keeps what it has and adds nothing (steps visit the keys in a cycle, where evicting the
    oldest would keep nothing that is used again)."""

    def __init__(self) -> None:
        self._positions: dict[Hashable, tuple[Tensor, Tensor]] = {}
        self._size = 0

    def get(self, key: Hashable) -> tuple[Tensor, Tensor] | None:
        return self._positions.get(key)

    def put(self, key: Hashable, positions: tuple[Tensor, Tensor]) -> None:
        size = positions[0].numel() + positions[1].numel()
        if self._size + size <= MAX_DESTINATION_TOKENS:
            self._positions[key] = positions
            self._size += size


def observe_calls(model: nn.Module, state: TokenMergingState, observe: Callable[..., None], *args: Any,
                  prepend: bool = False) -> None:
    """Run ``observe(state, *args, module, args, kwargs)`` before every call of ``model`` (it reads the call's grid
    and timestep), and count the calls in progress (``state.running``: sublayers merge only inside one); the hooks
    go with ``state``'s handles. Partials, not closures: ``copy.deepcopy`` copies them.

    ``prepend``: ``observe`` runs before the model's other pre-hooks, so it reads the call as its caller made it
    (where Sparse Context's thinned call hides the target grid's shape: JoyImage Edit)."""
    state.handles.append(model.register_forward_pre_hook(functools.partial(_enter, state)))
    state.handles.append(model.register_forward_pre_hook(functools.partial(observe, state, *args), with_kwargs=True,
                                                         prepend=prepend))
    state.handles.append(model.register_forward_hook(functools.partial(_leave, state), always_call=True))


def _enter(state: TokenMergingState, module: nn.Module, args: tuple) -> None:
    refuse_output_caches(module, state.sublayers)  # e.g. a cache enabled after apply_token_merging
    state.running += 1


def _leave(state: TokenMergingState, module: nn.Module, args: tuple, output: Any) -> None:
    state.running = max(state.running - 1, 0)  # also when the call raised (always_call)
    state.square_masks.clear()  # no mask, nor a thinning of one, outlives the call


def latent_grid(module: nn.Module, x: Any, patch: int = 2) -> tuple[int, int] | None:
    """``(H / p, W / p)``: the row-major token grid that ``module`` patchifies its latent ``x (B, C, H, W)`` into,
    ``p`` its config's ``patch_size`` (``patch`` where the config has none); ``None`` where ``x`` is no such latent."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        return None
    p = int(module.config.get("patch_size", patch) or 1)
    return x.shape[-2] // p, x.shape[-1] // p


def observe_latent(state: TokenMergingState, box: dict, patch: int, module: nn.Module, args: tuple,
                   kwargs: dict) -> None:
    """An ``observe`` for :func:`observe_calls` (``observe_calls(model, state, observe_latent, box, patch)``) on a model
    whose blocks see the grid of its latent ``hidden_states (B, C, H, W)``: ``box["grid"]``, the call's
    :func:`latent_grid` (``patch``: the default patch size); the step from its ``timestep``."""
    call = as_keywords(module, args, kwargs)
    box["grid"] = latent_grid(module, call.get("hidden_states"), patch)
    state.observe(first_arg(call, "timestep"), call, box["grid"])
