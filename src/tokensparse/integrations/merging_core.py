"""Token merging wired into a model's sublayers: per-model state and the per-block hooks (no targets here).

:class:`BlockMerger` puts a forward pre-hook and a forward hook on each merged sublayer of one block: the
first computes (or, between recompute steps, looks up) the matching of the block's target grid, every one
merges its input's grid tokens before the call and unmerges its output after. The grid is a span of the
sublayer's tokens; tokens around it (text, reference tokens) pass through. The hooks act only inside a call of
the merged model (or the backward recomputation of one): a module it shares with another model -- Z-Image's
ControlNet runs the transformer's own noise-refiner blocks -- runs unmerged in that model's calls. Targets are wired in
:mod:`.merging_hooks` (RefDiT) and :mod:`.merging_diffusers` (diffusers UNets and transformers).
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..generation import StepTracker, check_scheduler, copy_keeping_copied_owners, state_without_pipelines
from ..merging import (
    Matching,
    TokenMergingConfig,
    destination_positions,
    match_positions,
    num_sources,
    random_destinations,
)

logger = logging.getLogger(__name__)

GridFn = Callable[[int], "tuple[int, int, int] | None"]  # tokens of a call -> (h, w, start) of its target grid
RopeFn = Callable[[tuple, dict, Matching, int, "tuple[int, int]"], "tuple[tuple, dict]"]


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
                              "kinds": set(), "_destinations": Destinations(), **state, "_recorded": Recorded(),
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
        self.kinds: set[Hashable] = set()  # (shape, grad mode) of the calls of the current step, see observe
        self._destinations = Destinations()  # each layer's destination positions by step, see destinations()

    @property
    def step(self) -> int:
        return max(self.tracker.step, 0)

    def new_generation(self) -> None:
        self.tracker.reset()

    def observe(self, t: Any, call: dict | None = None, shape: Hashable = None) -> None:
        """Record a model call (its timestep, ``None`` read as 0, and arguments); starts a fresh cache when a new
        generation begins.

        ``call``: the call's arguments by name; their fingerprint tells the passes of a step apart, so an
        identical call repeated at one timestep reuses its matchings (same output, bounded cache).
        ``shape``: the call's batch size and target grid (see :func:`call_shape`), ``None`` if unknown.

        Steps: calls at one timestep are the passes of a step (guidance), a lower timestep is the next step, a
        higher one starts a new generation (:class:`~tokensparse.generation.StepTracker`). A call that cannot
        continue the current generation starts a new one as well:

        - a switch into or out of ``torch.inference_mode()`` (a training step after a generation run under it);
        - the first call of a new step whose shape and grad mode no call of the previous step had (another batch
          or image size; a grad-enabled training step after a generation under ``no_grad``, or the reverse). Passes
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
        kind = (shape, torch.is_grad_enabled())
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

    def matching(self, layer: str, x: Tensor, grid: tuple[int, int], shared: bool = False) -> Matching:
        """The matching of ``layer`` for tokens ``x`` at this step (computed, or reused from the cache).

        shared: one matching for the whole batch, computed from the batch-mean metric (for models whose
        positional tables have no batch dimension, like FLUX's RoPE).
        """
        cfg = self.cfg
        n = x.shape[1]

        def compute() -> Matching:
            src_pos, dst_pos = self.destinations(layer, grid, x.device)
            n_src = num_sources(grid[0], grid[1])  # random_destinations' default cell
            metric = x.mean(0, keepdim=True) if shared else x
            if cfg.adaptive:
                m = match_positions(metric, src_pos, dst_pos, threshold=cfg.threshold, cap=cfg.num_merged(n, n_src),
                                    center=cfg.center)
            else:
                m = match_positions(metric, src_pos, dst_pos, num=cfg.num_merged(n, n_src), center=cfg.center)
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


MAX_RECORDED = 4096
"""Inputs whose values :class:`Recorded` keeps for their recomputation in backward (under gradient
checkpointing), oldest dropped first; a recomputation uses its entry up. Enough for hundreds of forwards of a
deep model before one backward."""


class Recorded:
    """What forwards computed, by key (a module and a fingerprint of its input), for gradient checkpointing: a
    block recomputed in backward must get what its forward got. :meth:`pop` hands back the newest value pushed
    for a key (backward visits the forwards newest first) and uses it up; at most :data:`MAX_RECORDED` keys,
    oldest dropped first. Token merging records matchings, Sparse Context's block hooks their call's thinning."""

    def __init__(self) -> None:
        self._stacks: OrderedDict[Hashable, list[Any]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._stacks)

    def push(self, key: Hashable, value: Any) -> None:
        self._stacks.setdefault(key, []).append(value)
        self._stacks.move_to_end(key)
        while len(self._stacks) > MAX_RECORDED:
            self._stacks.popitem(last=False)

    def pop(self, key: Hashable) -> Any | None:
        """The newest value pushed for ``key``, removed; ``None`` if there is none."""
        stack = self._stacks.get(key)
        if not stack:
            return None
        value = stack.pop()
        if not stack:
            del self._stacks[key]
        return value


def call_shape(tokens: Any, grid: Any) -> tuple[int | None, Any]:
    """A model call's shape for :meth:`TokenMergingState.observe`: its batch size (``tokens``' first dimension, or
    the length of a list of per-sample tensors) and its target ``grid`` (any hashable: ``(h, w)``, a latent's
    shape), the things a generation keeps from step to step whatever else its calls change (reference tokens
    thinned, a K/V-extract call)."""
    batch = None
    if isinstance(tokens, Tensor) and tokens.dim() >= 1:
        batch = tokens.shape[0]
    elif isinstance(tokens, (list, tuple)):
        batch = len(tokens)
    return batch, grid


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now (a checkpointed block being recomputed)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def call_key(call: dict) -> Hashable:
    """A fingerprint of a model call's arguments: equal for identical calls, different (in practice) otherwise.

    Tensors count by shape, dtype, 16 evenly spaced values and, past 16 values, their sum (integer and bool tensors
    also by a position-weighted sum, so a permutation of token ids differs; a tensor of at most 16 values is
    sampled whole, which tells any change). Numbers, strings and ``None`` by value;
    lists, tuples and dicts by their contents (three levels deep); other objects by identity (RefDiT's reference
    ``TokenSeq`` and cached ``ContextKV``: ``generate`` passes one object per distinct context, so CFG's two
    branches under the null prompt are one call with the cache as without it). float32 on the tensors' device (MPS
    has no float64), one host copy per device. Every model call of a merged model takes one, so it is kept to a
    few ops per tensor: one strided slice for the sample, the sums stacked once per device, the ramps kept.
    """
    meta: list[Hashable] = []
    samples: dict[torch.device, list[Tensor]] = {}
    sums: dict[torch.device, list[Tensor]] = {}

    def visit(path: tuple, v: Any, depth: int) -> None:
        if isinstance(v, Tensor):
            meta.append((path, tuple(v.shape), str(v.dtype)))
            n = v.numel()
            if n and not v.is_complex():
                flat = v.detach().reshape(-1)
                step = max(1, n // 16)
                samples.setdefault(flat.device, []).append(flat[: 16 * step: step].float())
                if n > 16:
                    out = sums.setdefault(flat.device, [])
                    out.append(flat.sum(dtype=torch.float32))
                    if not flat.is_floating_point():  # ids and masks: order matters (a permutation must differ)
                        out.append((flat * _ramp(n, flat.device)).sum())
        elif v is None or isinstance(v, (bool, int, float, str)):
            meta.append((path, v))
        elif isinstance(v, (list, tuple, dict)) and depth < 3:
            items = sorted(v.items(), key=lambda kv: str(kv[0])) if isinstance(v, dict) else enumerate(v)
            meta.append((path, type(v).__name__, len(v)))
            for k, item in items:
                visit((*path, k), item, depth + 1)
        else:
            meta.append((path, id(v)))

    for name in sorted(call):
        visit((name,), call[name], 0)
    values: list[float] = []
    for dev in sorted(samples, key=str):
        probes = samples[dev] + ([torch.stack(sums[dev])] if dev in sums else [])
        values.extend(torch.cat(probes).cpu().tolist())
    return tuple(meta), tuple(values)


@functools.lru_cache(maxsize=16)
def _ramp(n: int, device: torch.device) -> Tensor:
    """``linspace(1, 2, n)`` on ``device``, the weights of :func:`call_key`'s position-weighted sums (made once per
    length: every call of a model passes ids of the same length). Made outside inference mode."""
    with torch.inference_mode(False):
        return torch.linspace(1.0, 2.0, n, device=device)


@dataclass
class Sublayer:
    module: nn.Module
    tokens: str  # name of the token argument: positional index 0 or this keyword
    rope: RopeFn | None = None  # merges the call's positional table along with the tokens
    target_only: bool = False  # RefDiT mlp: only calls with role="target"
    outputs: tuple[int, ...] = (0,)  # which elements of a tuple output are the merged tokens' (unmerged)
    context_first: bool = False  # joint attention over [context, tokens]: a key mask may span both (FLUX)
    # self-attention called with its tokens passed again as encoder_hidden_states (Lumina 2): merged along
    self_context: bool = False
    # called again in the block on other tokens (CogView4's ff, on the text stream next): only its first call in
    # each call of the block merges (BlockMerger's block= marks where a block call starts)
    first_call: bool = False


class BlockMerger:
    """Hooks on the sublayers of one block; the first merged sublayer owns the matching lookup."""

    def __init__(self, state: TokenMergingState, name: str, sublayers: list[Sublayer],
                 grid: GridFn, shared: bool = False, block: nn.Module | None = None) -> None:
        self.state, self.name, self.grid, self.shared = state, name, grid, shared
        self.current: Matching | None = None
        self.span = (0, 0)  # (start, length) of the target grid in the sublayer's input: the tokens merged
        self.called: set[int] = set()  # first_call sublayers called in this block call
        if block is None and any(sub.first_call for sub in sublayers):
            raise ValueError(f"{name}: a first_call sublayer needs its block (block=), whose calls reset it")
        if block is not None:  # first_call sublayers: each block call starts afresh
            state.handles.append(block.register_forward_pre_hook(functools.partial(BlockMerger._start, self)))
        state.sublayers.extend(m for sub in sublayers for m in sub.module.modules())
        for i, sub in enumerate(sublayers):  # partials of methods, not closures: copy.deepcopy copies them along
            pre, post = functools.partial(self._pre, sub, i == 0), functools.partial(self._post, sub)
            state.handles.append(sub.module.register_forward_pre_hook(pre, with_kwargs=True))
            state.handles.append(sub.module.register_forward_hook(post, with_kwargs=True))

    def _start(self, module: nn.Module, args: tuple) -> None:
        self.called = set()

    def _pre(self, sub: Sublayer, owner: bool, module: nn.Module, args: tuple, kwargs: dict
             ) -> tuple[tuple, dict] | None:
        module.__dict__["_tokensparse_active"] = None
        if not self.state.running and not _in_backward():  # called by another model sharing it (a ControlNet)
            return None
        if sub.target_only and kwargs.get("role", "target") != "target":
            return None
        if sub.first_call:
            if id(sub) in self.called:  # a later call in the block (CogView4's ff on the text stream): never merged
                return None
            self.called.add(id(sub))
        from_kwargs = not args
        x = kwargs[sub.tokens] if from_kwargs else args[0]
        if owner:
            grid = self.grid(x.shape[1])
            self.state.grids_found += grid is not None and min(grid[:2]) >= 2  # 1 x n: no 2x2 cell to merge in
            self.current = None
            if grid is not None:
                self.span = (grid[2], grid[0] * grid[1])
                self.current = self.state.matching(self.name, part(x, self.span), grid[:2], self.shared)
        m, span = self.current, self.span
        if m is None or m.num_merged == 0:
            return None
        if not m.fits(part(x, span)):  # e.g. diffusers' forward chunking calls ff on slices of the tokens
            if not self.state.warned_misfit:
                self.state.warned_misfit = True
                logger.warning("tokensparse: token merging: %s of %s got %d tokens where the block's grid has %d "
                               "(feed-forward chunking, enable_forward_chunking?); it runs unmerged",
                               type(module).__name__, self.name, x.shape[1], span[1])
            return None
        context = kwargs.get("encoder_hidden_states")
        self_context = sub.self_context and context is x
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() >= 2:
            mask = self._merged_mask(module, mask, m, span, x.shape[1], None if self_context else context,
                                     sub.context_first)
            if mask is None:
                return None
            kwargs = {**kwargs, "attention_mask": mask}
        module.__dict__["_tokensparse_active"] = (m, span)
        merged = merge_span(m, x, span)
        if from_kwargs:
            kwargs = {**kwargs, sub.tokens: merged}
        else:
            args = (merged, *args[1:])
        if self_context:
            kwargs = {**kwargs, "encoder_hidden_states": merged}
        if sub.rope is not None:
            args, kwargs = sub.rope(args, kwargs, m, x.shape[1], span)
        return args, kwargs

    def _merged_mask(self, module: nn.Module, mask: Tensor, m: Matching, span: tuple[int, int], n: int,
                     context: Any, context_first: bool = False) -> Tensor | None:
        """The sublayer's ``attention_mask`` for the merged tokens, or ``None`` (run it unmerged).

        A self-attention key mask over these ``n`` tokens keeps the entries of the surviving tokens
        (:func:`merge_key_mask`); a cross-attention mask (over ``context``) is unchanged; with ``context_first``
        (FLUX double-stream attention: keys ``[context, tokens]``, e.g. proportional Sparse Context's bias) a key
        mask over context + tokens keeps the context's entries and the surviving tokens'. A query x key mask over
        the same tokens (Chroma's ``(B, 1, L, L)``) keeps the surviving tokens' rows and columns
        (:func:`merge_query_key_mask`). Any other mask -- over context + tokens in another order (SD3 joint
        attention), a merge across the mask -- runs that sublayer unmerged, with a one-time warning."""
        n_ctx = context.shape[1] if isinstance(context, Tensor) and context.dim() == 3 else 0
        if n_ctx and mask.shape[-1] == n_ctx:
            return mask  # cross-attention: its keys are the context's, which merging leaves alone
        if n_ctx and context_first and mask.shape[-1] == n_ctx + n:
            span, n = (n_ctx + span[0], span[1]), n_ctx + n
        merged = merge_key_mask(mask, m, span, n)
        if merged is None and mask.dim() >= 3 and mask.shape[-2] == n:
            merged = merge_query_key_mask(mask, m, span, n)
        if merged is not None:
            return merged
        if not self.state.warned_mask:
            self.state.warned_mask = True
            logger.warning("tokensparse: token merging: %s of %s got an attention_mask of shape %s that it cannot "
                           "thin with the tokens (%d tokens, %d context); it runs unmerged", type(module).__name__,
                           self.name, tuple(mask.shape), n, n_ctx)
        return None

    def _post(self, sub: Sublayer, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        active = module.__dict__.pop("_tokensparse_active", None)
        if active is None:
            return None
        m, span = active
        if isinstance(output, tuple):
            return tuple(unmerge_span(m, o, span) if i in sub.outputs else o for i, o in enumerate(output))
        return unmerge_span(m, output, span)


def merge_key_mask(mask: Tensor, m: Matching, span: tuple[int, int], n: int) -> Tensor | None:
    """A self-attention key mask ``(B or 1, [1, [1,]] n)`` over ``n`` tokens, for the tokens :func:`merge_span`
    leaves: the entries of the surviving keys (around the span, and the span's kept tokens), in order.

    ``None`` (the sublayer must run unmerged) where that would change what attention sees: the mask is not
    over these ``n`` keys, has a query axis (``(B, n, n)``), a batch other than 1 or the matching's, or a
    merged pair whose two tokens the mask treats differently (a visible token would vanish into a masked
    one, or a masked one become visible through a visible one)."""
    b = m.batch_size
    if mask.shape[-1] != n or mask.shape[0] not in (1, b) or any(s != 1 for s in mask.shape[1:-1]):
        return None
    key = mask.reshape(mask.shape[0], n).expand(b, n)
    inner = part(key, span)
    if not torch.equal(m.unmerge(m.merge(inner, mode="keep")), inner):  # a source masked unlike its destination
        return None
    merged = merge_span(m, key, span, mode="keep")
    return merged.reshape(b, *mask.shape[1:-1], merged.shape[1])


def merge_query_key_mask(mask: Tensor, m: Matching, span: tuple[int, int], n: int) -> Tensor | None:
    """A self-attention query x key mask ``(B or 1, [1,] n, n)`` over ``n`` tokens (queries and keys the same
    tokens, e.g. Chroma's product of a key mask with itself), for the tokens :func:`merge_span` leaves: the rows
    and columns of the surviving tokens, in order.

    ``None`` (the sublayer must run unmerged) where the mask is not that, or where a merged pair's two tokens
    have different rows or columns (the merged token would attend, or be attended, unlike one of them)."""
    b = m.batch_size
    if (mask.dim() < 3 or mask.shape[-1] != n or mask.shape[-2] != n or mask.shape[0] not in (1, b)
            or any(s != 1 for s in mask.shape[1:-2])):
        return None
    sq = mask.reshape(mask.shape[0], n, n).expand(b, n, n)
    for side in (sq, sq.transpose(1, 2)):  # rows (queries), then columns (keys)
        inner = part(side, span)
        if not torch.equal(m.unmerge(m.merge(inner, mode="keep")), inner):
            return None
    rows = merge_span(m, sq, span, mode="keep")
    merged = merge_span(m, rows.transpose(1, 2), span, mode="keep").transpose(1, 2)
    return merged.reshape(b, *mask.shape[1:-2], merged.shape[1], merged.shape[2])


def observe_calls(model: nn.Module, state: TokenMergingState, observe: Callable[..., None], *args: Any) -> None:
    """Run ``observe(state, *args, module, args, kwargs)`` before every call of ``model`` (it reads the call's grid
    and timestep), and count the calls in progress (``state.running``: sublayers merge only inside one); the hooks
    go with ``state``'s handles. Partials, not closures: ``copy.deepcopy`` copies them."""
    state.handles.append(model.register_forward_pre_hook(functools.partial(_enter, state)))
    state.handles.append(model.register_forward_pre_hook(functools.partial(observe, state, *args), with_kwargs=True))
    state.handles.append(model.register_forward_hook(functools.partial(_leave, state), always_call=True))


def _enter(state: TokenMergingState, module: nn.Module, args: tuple) -> None:
    refuse_output_caches(module, state.sublayers)  # e.g. a cache enabled after apply_token_merging
    state.running += 1


#: diffusers hooks that read a sublayer's tokens as the model's image grid: Smoothed Energy Guidance (a guider's pass,
#: modular pipelines) blurs an attention's queries as a square grid of the sequence, which merged tokens are not
GRID_HOOKS = ("SmoothedEnergyGuidanceHook",)


def _hooks_on(model: nn.Module, modules: list[nn.Module]) -> list[tuple[Any, str]]:
    """The diffusers hooks (``module._diffusers_hook``) on ``modules`` of ``model``, each with its module's name; a
    dict lookup per module when there is none (every model call checks)."""
    found: list[tuple[Any, str]] = []
    for module in modules:
        hooks = getattr(module.__dict__.get("_diffusers_hook"), "hooks", None)  # its HookRegistry's {name: hook}
        if hooks:
            name = next((n for n, m in model.named_modules() if m is module), type(module).__name__)
            found.extend((hook, name) for hook in hooks.values())
    return found


def _named(found: list[tuple[Any, str]], pick: Callable[[Any], bool]) -> list[str]:
    """The hooks of ``found`` for which ``pick(hook)``, as distinct ``"HookClass on module.name"``."""
    return list(dict.fromkeys(f"{type(hook).__name__} on {name}" for hook, name in found if pick(hook)))


def _stateful(hook: Any) -> bool:
    return bool(getattr(hook, "_is_stateful", False))


def _reads_grid(hook: Any) -> bool:
    return type(hook).__name__ in GRID_HOOKS


def _first(found: list[str]) -> str:
    return "; ".join(found[:3]) + ("; ..." if len(found) > 3 else "")


def refuse_output_caches(model: nn.Module, modules: list[nn.Module]) -> None:
    """``ValueError`` where ``modules`` of ``model`` (merged sublayers and the modules inside them) carry a stateful
    diffusers hook: Pyramid Attention Broadcast, FasterCache and TaylorSeer caches hand back (or extrapolate from) a
    module's output of an earlier step, whose merged tokens this step's matching would unmerge into the wrong tokens
    (or fail); block-level caches (FirstBlockCache, MagCache) hook the blocks around the merged sublayers, whose
    outputs are unmerged, and pass. Or one of :data:`GRID_HOOKS`, which read its merged tokens as the image grid
    (Smoothed Energy Guidance). One pass over ``modules`` (every model call checks)."""
    found = _hooks_on(model, modules)
    if not found:
        return
    caches = _named(found, _stateful)
    if caches:
        raise ValueError(
            f"token merging cannot run under diffusers caches that reuse a merged sublayer's output across steps "
            f"({_first(caches)}): that output holds an earlier step's merged tokens, which another step's matching "
            f"would unmerge into the wrong tokens; disable the cache (e.g. transformer.disable_cache()) or use a "
            f"block-level one (FirstBlockCache, MagCache), which stacks with token merging")
    grid = _named(found, _reads_grid)
    if grid:
        raise ValueError(
            f"token merging cannot run under Smoothed Energy Guidance ({_first(grid)}): it blurs an attention's "
            f"queries as a square grid of the sequence's tokens, and a merged sublayer's tokens are fewer and out of "
            f"grid order; use another guider or remove token merging (ts.remove_token_merging)")


def _leave(state: TokenMergingState, module: nn.Module, args: tuple, output: Any) -> None:
    state.running = max(state.running - 1, 0)  # also when the call raised (always_call)


def merge_block(state: TokenMergingState, name: str, attn: Sublayer | None, mlp: Sublayer | None, grid: GridFn,
                **kwargs: Any) -> BlockMerger | None:
    """A :class:`BlockMerger` over a block's attention and MLP sublayers, those ``state.cfg`` selects (``merge_attn``
    / ``merge_mlp``; ``None``: the block has no such sublayer), in that order; ``None`` when it selects neither."""
    subs = [sub for sub, on in ((attn, state.cfg.merge_attn), (mlp, state.cfg.merge_mlp)) if on and sub is not None]
    return BlockMerger(state, name, subs, grid, **kwargs) if subs else None


def part(x: Tensor, span: tuple[int, int]) -> Tensor:
    """The tokens ``(start, length)`` of ``span``: the target grid within a sublayer's input (``x`` itself where the
    span is all of it, as in a DiT whose blocks see only the image tokens: no slicing op per sublayer call)."""
    if span[0] == 0 and span[1] == x.shape[1]:
        return x
    return x[:, span[0]:span[0] + span[1]]


def merge_span(m: Matching, x: Tensor, span: tuple[int, int], mode: str = "mean") -> Tensor:
    """Merge the target grid ``x[:, start:start + n]``; tokens around it (references) pass as they are."""
    start, n = span
    if start == 0 and n == x.shape[1]:
        return m.merge(x, mode=mode)
    return torch.cat([x[:, :start], m.merge(x[:, start:start + n], mode=mode), x[:, start + n:]], 1)


def unmerge_span(m: Matching, y: Tensor, span: tuple[int, int]) -> Tensor:
    """Inverse of :func:`merge_span` on a sublayer's output, whose target part is ``n - merged`` rows long."""
    start, k = span[0], span[1] - m.num_merged
    if start == 0 and k == y.shape[1]:
        return m.unmerge(y)
    return torch.cat([y[:, :start], m.unmerge(y[:, start:start + k]), y[:, start + k:]], 1)
