"""The base of the diffusers adapters: where a transformer call's reference tokens are (:class:`RefLayout`) and
what the Sparse Context hook asks of an adapter (:class:`InContextAdapter`), and how hooks inside a transformer's
blocks get the running call's thinning again when gradient checkpointing recomputes a block (:class:`BlockReplay`).
Model knowledge lives in the family modules (:mod:`.diffusers_models` and the modules it imports); the wiring in
:mod:`.diffusers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .diffusers_proportional import with_bias
from .fingerprints import Recorded, _in_backward, call_key


@dataclass
class RefLayout:
    """The reference tokens of one transformer call.

    n: length of the dense image sequence (target + references).
    positions: per reference, ``(n_r,)`` positions of its tokens in the sequence.
    cells: per reference, ``(n_r,)`` row-major index of each token's cell in its ``h x w`` grid.
    grids: per reference, its grid ``(h, w)``.
    """

    n: int
    positions: list[Tensor]
    cells: list[Tensor]
    grids: list[tuple[int, int]]

    @property
    def num_ref_tokens(self) -> int:
        return sum(len(p) for p in self.positions)


def grid_layout(ids: Tensor, target: int = 0) -> RefLayout | None:
    """Layout from FLUX-style ids ``(N, D)`` whose first coordinate is ``target`` for the target, else a reference
    (each run of one value: a reference, its cells from the ids' second and third coordinates)."""
    t = ids[:, 0]
    is_ref = t != target
    if not bool(is_ref.any()):
        return None
    positions, cells, grids = [], [], []
    for value in torch.unique_consecutive(t[is_ref]).tolist():
        pos = torch.nonzero(t == value).squeeze(1)
        rows = ids[pos, 1].long()
        cols = ids[pos, 2].long()
        rows, cols = rows - rows.min(), cols - cols.min()
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        if h * w != len(pos):
            raise ValueError(
                f"reference with id {value} has {len(pos)} tokens but spans a {h}x{w} grid; "
                "tokensparse expects dense references (is another token-dropping patch applied?)"
            )
        positions.append(pos)
        cells.append(rows * w + cols)
        grids.append((h, w))
    return RefLayout(ids.shape[0], positions, cells, grids)


class InContextAdapter:
    """What the hook asks of every adapter; the defaults fit transformers called with ``hidden_states (B, N, C)``,
    a falling ``timestep``, the references' pixels captured from the pipeline, and returning the token sequence
    (:meth:`scatter` puts the kept tokens' output back). Each adapter also has ``layout(kwargs) -> RefLayout | None``
    and ``subset(kwargs, index, layout, state)``."""

    cache_refusal: str | None = None  # why cache=True cannot run on this transformer, if it cannot
    # whether a call without reference tokens is worth a warning (VisualCloze: its upsampling stage has none)
    warns_without_references = True
    # whether every sample of a batch is selected on its own, with its own prompt (GLM-Image); else the batch shares
    # the first sample's selection (and selector "auto" reads the first prompt)
    selects_per_sample = False

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """The call's image tokens ``(B, N, C)``, the sequence :meth:`layout`'s positions index (selection features)."""
        return kwargs["hidden_states"]

    def timestep(self, kwargs: dict[str, Any]) -> float | None:
        """The call's timestep, falling over a generation (a rise starts a new one), or ``None``."""
        t = kwargs.get("timestep")
        return None if t is None else float(t.flatten()[0])

    def cache_mode(self, kwargs: dict[str, Any]) -> Any:
        """What, besides the sequence's shape, makes a call need a selection of its own (FLUX.2 [klein] KV: the
        extract step sees the references first, the others after the target)."""
        return kwargs.get("kv_cache_mode")

    def is_kv_cached_call(self, kwargs: dict[str, Any]) -> bool:
        """Whether the references come from a K/V cache in this call (nothing to subset)."""
        return False

    def fresh_references(self, kwargs: dict[str, Any]) -> bool:
        """Whether this call's references get a selection of their own (not the generation's)."""
        return False

    def call_inputs(self, state: Any, kwargs: dict[str, Any]) -> tuple[list | None, list | None, bool] | None:
        """``(pixels per reference, prompts, captured)`` for this call's selection; ``None``: what the pipeline's
        capture holds (the default)."""
        return None

    def selection_generator(self, cfg: Any, kwargs: dict[str, Any]) -> torch.Generator | None:
        """The generator this call's selection draws from; ``None`` (the default): a fresh one seeded ``cfg.seed``,
        drawn reference after reference (one call holds all references, so each gets its own draw)."""
        return None

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        """Companion hooks on ``transformer`` (objects with ``remove()``) that read ``state`` during a call."""
        return []

    def with_bias(self, call: dict[str, Any], bias: Tensor) -> dict[str, Any]:
        """The thinned ``call`` carrying ``proportional``'s bias: ``log(size)`` of each kept token of :meth:`layout`'s
        sequence ``(K,)``, in ``index`` order. The default: a ``(1, 1, 1, S_txt + K)`` additive mask in
        ``joint_attention_kwargs`` (FLUX: text first, then the kept image tokens)."""
        return with_bias(call, bias)

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        """The thinned call's output in the caller's shape: the kept tokens' rows put back at ``index`` of the dense
        ``layout.n``-token sequence (dropped rows zero); unchanged where the output is not over the kept tokens
        (a K/V extract step: the transformer already dropped the references)."""
        sample = output_sample(output)
        if sample.shape[1] != index.numel():
            return output
        dense = sample.new_zeros(sample.shape[0], layout.n, *sample.shape[2:])
        dense[:, index] = sample
        return with_sample(output, dense)


def output_sample(output: Any) -> Tensor:
    """The prediction in a transformer's output (a tuple's first item, or ``.sample``)."""
    return output[0] if isinstance(output, tuple) else output.sample


def with_sample(output: Any, sample: Tensor) -> Any:
    """``output`` with its prediction replaced by ``sample`` (a new tuple, or the output object updated)."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


class BlockReplay:
    """What companion hooks inside a transformer's blocks read of the running thinned call (``state.call``), kept
    for gradient checkpointing.

    A checkpointed block runs again in backward, after the transformer call it belonged to ended (``state.call`` is
    cleared, or already another call's), with the arguments its forward got. While the transformer's blocks may be
    recomputed (:meth:`start`: gradients on, ``gradient_checkpointing`` set), :meth:`current` records what each
    block call read, by block and arguments; a recomputation in backward gets it back (the newest recorded for its
    arguments: backward visits the forwards newest first), so it recomputes exactly what its forward computed.
    """

    def __init__(self) -> None:
        self.recording = False  # the running transformer call's blocks may be recomputed in backward
        self._recorded = Recorded()  # block calls kept for a backward (fingerprints.MAX_RECORDED at most)

    def __deepcopy__(self, memo: dict) -> BlockReplay:
        return BlockReplay()  # a backward in flight is the original model's

    def __getstate__(self) -> dict:
        return {"recording": False, "_recorded": Recorded()}

    def start(self, model: torch.nn.Module) -> None:
        """At a (thinned) call of ``model``, not its recomputation: whether its blocks' calls are to be recorded."""
        if not _in_backward():
            self.recording = torch.is_grad_enabled() and any(
                getattr(m, "gradient_checkpointing", False) is True for m in model.modules())

    def current(self, call: Any, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """``call`` (``state.call``) for this call of ``module`` (a block, or a sub-module of one) with ``args`` /
        ``kwargs``: in backward, what the forward of a call with these arguments read (``call`` if none was
        recorded); in a forward that may be recomputed, ``call``, recorded."""
        if _in_backward():
            if not self._recorded:
                return call
            found = self._recorded.pop((id(module), call_key({"args": args, "kwargs": kwargs})))
            return call if found is None else found
        if call is not None and self.recording:
            self._recorded.push((id(module), call_key({"args": args, "kwargs": kwargs})), call)
        return call
