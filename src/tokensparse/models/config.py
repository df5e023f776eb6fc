"""RefDiT's architecture config (re-exported from :mod:`.refdit`, where it was defined before 0.15.0)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import checks
from ..vocab import MAX_PROMPT_LEN, VOCAB_SLOTS


@dataclass(frozen=True)
class RefDiTConfig:
    """Architecture of a RefDiT.

    image_size: side of the (square) target and reference images in pixels, a multiple of ``patch_size``.
    patch_size: pixels per token side; ``channels``: image channels.
    dim, depth, heads, mlp_ratio: width, number of blocks, attention heads (``dim % heads == 0``) and MLP
        width over ``dim``.
    max_refs: most reference images per call; vocab_size / max_prompt_len: prompt vocabulary slots (at least
        ``tokensparse.vocab.VOCAB_SLOTS``) and the longest prompt in words.
    rope_axes: how each head's dimensions split over the 3 RoPE axes (reference index, row, col): even, summing
        to ``dim // heads``; rope_theta: RoPE base.
    ref_attends_target: ``True``: one joint attention over target and context; ``False``: the context never
        sees the target and is modulated at ``t = 0``, so its K/V can be cached (``SparseContextConfig(cache=True)``).
    route_span: ``(start, end)`` blocks that routed target tokens skip (TREAD, Sparse Guidance's branches), or
        ``None``.
    text_depth: transformer blocks over the prompt before the DiT (``0``: word and position embeddings only).
    """

    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    dim: int = 192
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    max_refs: int = 4
    vocab_size: int = VOCAB_SLOTS
    max_prompt_len: int = MAX_PROMPT_LEN
    rope_axes: tuple[int, int, int] = (8, 12, 12)
    rope_theta: float = 10_000.0
    ref_attends_target: bool = True
    route_span: tuple[int, int] | None = None
    text_depth: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # frozen: normalise in place (numpy ints, lists -> tuples)

        for name in ("image_size", "patch_size", "channels", "dim", "depth", "heads", "max_refs", "max_prompt_len"):
            put(name, checks.integer(name, getattr(self, name), lo=1))
        put("vocab_size", checks.integer("vocab_size", self.vocab_size, lo=VOCAB_SLOTS))
        put("text_depth", checks.integer("text_depth", self.text_depth, lo=0))
        put("mlp_ratio", checks.real("mlp_ratio", self.mlp_ratio, 0.0, lo_open=True))
        put("rope_theta", checks.real("rope_theta", self.rope_theta, 0.0, lo_open=True))
        put("ref_attends_target", checks.flag("ref_attends_target", self.ref_attends_target))
        if not isinstance(self.rope_axes, (tuple, list)) or len(self.rope_axes) != 3:
            raise TypeError(f"rope_axes must be 3 ints (ref index, row, col), got {self.rope_axes!r}")
        put("rope_axes", tuple(checks.integer(f"rope_axes[{i}]", a, lo=0) for i, a in enumerate(self.rope_axes)))
        if self.route_span is not None:
            if not isinstance(self.route_span, (tuple, list)) or len(self.route_span) != 2:
                raise TypeError(f"route_span must be a (start, end) pair or None, got {self.route_span!r}")
            put("route_span", tuple(checks.integer(f"route_span[{i}]", a) for i, a in enumerate(self.route_span)))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        head_dim = self.dim // self.heads
        if head_dim % 2:  # no even rope_axes sum to it: the message below would ask for the impossible
            raise ValueError(f"head_dim {head_dim} (dim {self.dim} / heads {self.heads}) is odd; RoPE turns pairs of "
                             "channels, so choose dim and heads whose quotient is even")
        if sum(self.rope_axes) != head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to head_dim {head_dim} (dim {self.dim} "
                             f"/ heads {self.heads})")
        if self.route_span is not None and not 0 <= self.route_span[0] < self.route_span[1] <= self.depth:
            raise ValueError(f"route_span {self.route_span} must satisfy 0 <= start < end <= depth={self.depth}")

    @property
    def grid(self) -> int:
        """Tokens per image side."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels
