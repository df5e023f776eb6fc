"""``tokensparse.generate``: one call from references and a prompt to images, for RefDiT."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import checks
from .api import sparse_context_config
from .flow import SAMPLERS, check_shift, check_steps, noise_like, timesteps
from .generation import begin_generation
from .guidance import Branch, CFGConfig, GuidanceConfig, SparseGuidanceConfig, guided
from .images import ImageLike, batch_images, to_tensor
from .models.refdit import RefDiT
from .selection import topk_mask
from .tokens import TokenSeq, grid_ids, subset
from .vocab import tokenize


def _keep_counts(seq: TokenSeq, keep: float) -> list[tuple[Tensor, Tensor]]:
    """Per reference of ``seq``: its (valid) tokens ``(B, N)`` bool and how many of them :func:`random_keep` keeps
    in each sample ``(B,)`` (``keep`` of them, rounded, at least one)."""
    refs = seq.ids[..., 0].cpu()
    out = []
    for r in refs.unique().tolist():
        in_r = refs == r
        if seq.valid is not None:
            in_r &= seq.valid.cpu()
        out.append((in_r, (in_r.sum(1).float() * keep).round().clamp(min=1).long()))
    return out


def random_keep(seq: TokenSeq, keep: float, generator: torch.Generator) -> Tensor:
    """A uniformly random keep mask ``(B, N)`` keeping ``keep`` of each reference's (valid) tokens."""
    n = seq.tokens.shape[1]
    scores = torch.rand(seq.tokens.shape[0], n, generator=generator, dtype=torch.float32)
    if seq.valid is not None:
        scores = scores.masked_fill(~seq.valid.cpu(), -1.0)
    mask = torch.zeros(seq.tokens.shape[0], n, dtype=torch.bool)
    for in_r, counts in _keep_counts(seq, keep):
        mask |= topk_mask(scores.masked_fill(~in_r, -2.0), counts) & in_r
    return mask.to(seq.tokens.device)


def keeps_every_token(seq: TokenSeq, keep: float) -> bool:
    """Whether :func:`random_keep` at ``keep`` keeps every (valid) token of every reference in every sample of
    ``seq`` (``keep`` close to 1, or references of a few tokens): it would drop nothing."""
    return all(bool((counts >= in_r.sum(1)).all()) for in_r, counts in _keep_counts(seq, keep))


_GRAY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # one-band PIL modes holding values (not "P")


def _references(images: list[ImageLike], channels: int) -> list[Tensor]:
    """References -> a list of ``(B, channels, H, W)`` float32 tensors in [0, 1], values read as
    :func:`~tokensparse.images.to_tensor` reads them.

    ``channels=3`` (RGB) is :func:`~tokensparse.images.batch_images`: 1- and 4-channel images are made RGB. For any
    other count a reference must have exactly ``channels`` channels: ``(C, H, W)`` or ``(H, W, C)`` (``(H, W)`` for
    one), a batch ``(B, C, H, W)`` / ``(B, H, W, C)``, or a PIL image with that many bands (``"L"``, ``"I;16"``...
    for 1, ``"RGBA"`` for 4). ``ValueError`` naming the reference otherwise.
    """
    if channels == 3:
        return batch_images(images)
    return [_reference(image, channels, i) for i, image in enumerate(images)]


def _reference(image: ImageLike, channels: int, i: int) -> Tensor:
    """Reference ``i`` of a model taking ``channels`` (not 3) channels -> ``(B, channels, H, W)``."""
    want = f"this model takes {channels}-channel images"
    if isinstance(image, Image.Image):
        bands = 1 if image.mode in _GRAY_MODES else None if image.mode in ("P", "PA") else len(image.getbands())
        if bands != channels:
            hint = ": convert it with image.convert('L')" if channels == 1 else ""
            raise ValueError(f"reference {i} is a PIL image in mode {image.mode!r}; {want}{hint}")
        if channels == 1:
            return to_tensor(image)[None, :1]
        image = np.asarray(image)
    if not isinstance(image, (np.ndarray, Tensor)):
        raise TypeError(f"reference {i}: expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    shape = tuple(image.shape)
    single = len(shape) in (2, 3)
    x = image[None] if single else image  # a batch (B, ...)
    if x.ndim == 3 and channels == 1:  # (1, H, W)
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] != channels and x.shape[-1] == channels:  # channels last
        x = np.moveaxis(x, -1, 1) if isinstance(x, np.ndarray) else x.movedim(-1, 1)
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"reference {i} has shape {shape}; {want}: (C, H, W) or (H, W, C)"
                         f"{' or (H, W)' if channels == 1 else ''}, or a batch (B, C, H, W) / (B, H, W, C), "
                         f"with C = {channels}")
    b, _, h, w = x.shape
    try:  # one 2-D image: to_tensor's value rules (and range checks) over the whole reference at once
        t = to_tensor(x.reshape(b * channels * h, w))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"reference {i}: {exc}") from None
    return t[0].reshape(b, channels, h, w)


@torch.no_grad()
def generate(
    model: RefDiT,
    references: list[ImageLike],
    prompt: str | list[str],
    *,
    steps: int = 20,
    seed: int | list[int] = 0,
    shift: float = 1.0,
    sampler: str = "euler",
    callback: Callable[[int, Tensor], Tensor | None] | None = None,
    guidance: GuidanceConfig | None = None,
) -> Tensor:
    """Generate ``(B, C, H, W)`` images in [0, 1], ``C = model.config.channels`` (3: RGB).

    references: PIL images, arrays or tensors in [0, 1], each one image (``(3, H, W)``, ``(H, W, 3)``, ...) or a
        batch (a 4-D tensor or array, ``(B, 3, H, W)`` / ``(B, H, W, 3)``); may be empty. Grayscale and RGBA
        images are made RGB; a model with ``channels`` other than 3 takes references with exactly that many
        channels (``(C, H, W)``, ``(H, W, C)``, ``(H, W)`` for one, batches; PIL images with that many bands).
    prompt: one prompt, or a list of ``B`` prompts; ``""`` is the null condition.
    steps: denoising steps (Euler steps of the rectified flow from noise at ``t = 1`` to ``t = 0``), in
        ``[1, tokensparse.flow.MAX_STEPS]`` (100,000).
    seed: sample ``i`` of the batch uses noise seed ``seed + i`` (independent of the batch it is in), or
        ``seed[i]`` when a list is given. With guidance that routes tokens or drops the weak branch's
        references, those draws are seeded from the first seed for the whole batch, so a guided sample also
        depends on its batch; so does one under Sparse Context with ``selector="random"``, whose draws come
        from the config's seed for the whole batch (they depend on the sample's place in it and its size, not on
        the other samples' images; every other selector scores each sample from its own references and prompt), and
        one under adaptive token merging (``TokenMergingConfig(threshold=...)``), where the batch merges the
        smallest of its samples' counts.
    shift: timestep shift (``tokensparse.flow.timesteps``): ``> 1`` spends more steps near noise; in
        ``[1e-4, 1e4]``.
    sampler: a name from ``tokensparse.flow.SAMPLERS`` (``"euler"``).
    callback: called as ``callback(step, x)`` after each step (``step`` from 0) with the current ``(B, C, H, W)``
        sample in the model's scale (images in ``[-1, 1]``), or ``None``. ``x`` is the live sample, and the callback
        may change it, as a diffusers ``callback_on_step_end`` may change its ``latents``: an in-place edit of ``x``,
        or a returned tensor of its shape (which replaces it), is what the next step continues from (after the last
        step, what the result is made of). Other returns (``None``) change nothing. A callback that only looks (a
        preview, a progress bar) needs no copy: no later step writes into ``x``.
    guidance: a :class:`~tokensparse.guidance.CFGConfig` or :class:`~tokensparse.guidance.SparseGuidanceConfig`
        (routing needs a model built with ``route_span``); ``None`` = one conditional dense pass per step.
    Methods applied to ``model`` (sparse context, token merging) take effect; selection runs once per call.
    """
    if not isinstance(model, RefDiT):
        hint = (": pass the RefDiT itself (compile in place with model.compile() instead of torch.compile(model))"
                if isinstance(getattr(model, "_orig_mod", None), RefDiT) else "")
        raise TypeError(f"generate expects a RefDiT, got {type(model).__name__}{hint}")
    _check_loaded(model)
    checks.choice("sampler", sampler, SAMPLERS)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"generate runs float32 models, this one is {dtype}: call model.float() first")
    steps = check_steps(steps)
    shift = check_shift(shift)
    if isinstance(seed, (list, tuple)):
        if not seed:
            raise ValueError("seed must be an int or a non-empty list of ints, got []")
        seed_list = [checks.seed(f"seed[{i}]", s) for i, s in enumerate(seed)]
    elif isinstance(seed, bool) or not (isinstance(seed, numbers.Integral)
                                        or (isinstance(seed, (Tensor, np.ndarray)) and seed.ndim == 0)):
        raise TypeError(f"seed must be an int or a list of ints, got {type(seed).__name__}")
    else:
        seed_list = [checks.seed("seed", seed)]
    if not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                         and all(isinstance(p, str) for p in prompt))):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
    if not isinstance(references, (list, tuple)):
        raise TypeError("references must be a list of images (empty for none), got "
                        f"{type(references).__name__}")
    if guidance is not None:
        guidance = _checked_guidance(model, guidance)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    refs = _references(list(references), model.config.channels)
    if not refs and _weakened_only_by_weak_keep(guidance, model.config.grid ** 2):
        raise ValueError("this SparseGuidanceConfig weakens its weak branch only by weak_keep (fewer reference "
                         "tokens) and this call has no references: both branches would be the same; set "
                         "strong < weak or null_weak, or pass no guidance")
    sizes = [len(prompts)] + [r.shape[0] for r in refs]  # the batch: the most prompts or reference images
    batch = max(sizes)
    if len(prompts) == 1:
        prompts = prompts * batch
    refs = [r.expand(batch, -1, -1, -1) if r.shape[0] == 1 else r for r in refs]
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for a batch of {batch} references")
    for i, r in enumerate(refs):
        if r.shape[0] != batch:  # say where the batch comes from (the model's check names only "the target")
            raise ValueError(f"reference {i} is a batch of {r.shape[0]} images, but this call's batch is {batch} "
                             f"(prompts: {sizes[0]}, images per reference: {sizes[1:]}): give each reference 1 image "
                             f"or {batch}")
    if isinstance(seed, (list, tuple)) and len(seed_list) != batch:
        raise ValueError(f"{len(seed_list)} seeds for a batch of {batch}")

    device = next(model.parameters()).device
    cfg = model.config
    prompt_ids = tokenize(prompts, cfg.max_prompt_len).to(device)
    model_refs = [(r.to(device) * 2 - 1) for r in refs]
    begin_generation(model)
    # embedding + selection, once per generation; prompt-aware selection (auto, attention) reads the prompt
    ref_tokens = model.embed_references(model_refs, batch, prompt_ids)
    if (ref_tokens is not None and _weakened_only_by_weak_keep(guidance, cfg.grid ** 2)
            and keeps_every_token(ref_tokens, guidance.weak_keep)):
        most = max(int(in_r.sum(1).max()) for in_r, _ in _keep_counts(ref_tokens, 1.0))
        way = ("set strong < weak or null_weak (no weak_keep drops a reference's only token: each keeps at least one)"
               if most <= 1 else "give a smaller weak_keep, strong < weak or null_weak")
        raise ValueError(f"guidance weak_keep={guidance.weak_keep} keeps every token of this call's references "
                         f"({most} or fewer each, as the model sees them), and weak_keep is all that weakens the weak "
                         f"branch: both branches would be the same; {way}")
    sparse_cfg = sparse_context_config(model)
    use_cache = sparse_cfg is not None and sparse_cfg.cache
    null_ids = torch.zeros_like(prompt_ids)
    first_seed = seed[0] if isinstance(seed, (list, tuple)) else seed
    route_gen = torch.Generator().manual_seed(int(first_seed) + 7919)  # routing draws its own randomness
    contexts: dict[tuple[bool, float], tuple] = {}

    def context(branch: Branch) -> tuple:
        """(reference tokens, prompt ids, cached K/V or None, prepared context or None) of a branch, built once per
        generation: with the cache its K/V, else the context the blocks start from at every step."""
        key = (branch.cond, branch.ref_keep)
        if key not in contexts:
            refs_b = ref_tokens
            if branch.ref_keep < 1.0 and ref_tokens is not None:  # sparse-reference guidance
                keep = random_keep(ref_tokens, branch.ref_keep, torch.Generator().manual_seed(int(first_seed)))
                refs_b = subset(ref_tokens, keep)
            ids = prompt_ids if branch.cond else null_ids
            same = next((c for c in contexts.values() if c[0] is refs_b and torch.equal(c[1], ids)), None)
            if same is not None:  # e.g. CFG under the null prompt: one context, one K/V (token merging's call
                contexts[key] = same  # fingerprint then sees the same call, as without the cache)
            else:
                contexts[key] = ((refs_b, ids, model.context_kv(refs_b, ids), None) if use_cache else
                                 (refs_b, ids, None, model.prepare_context(refs_b, ids)))
        return contexts[key]

    def branch_denoise(x: Tensor, t: Tensor, branches: tuple[Branch, ...]) -> list[Tensor]:
        """Branches with the same context run as one call sharing the blocks before the route span."""
        groups: dict[tuple[bool, float], list[int]] = {}
        for i, br in enumerate(branches):
            groups.setdefault((br.cond, br.ref_keep), []).append(i)
        out: list[Tensor] = [x] * len(branches)
        for idx in groups.values():
            refs_b, ids, kv, prepared = context(branches[idx[0]])
            ys = model(x, t, refs_b, ids, context_kv=kv, context=prepared, routes=tuple(branches[i].gamma for i in idx),
                       route_generator=route_gen)
            for i, y in zip(idx, ys):
                out[i] = y
        return out

    denoise = guided(branch_denoise, guidance)

    seeds = seed_list if isinstance(seed, (list, tuple)) else [seed_list[0] + i for i in range(batch)]  # Python ints
    x = noise_like((batch, cfg.channels, cfg.image_size, cfg.image_size), seeds, device)
    x0 = SAMPLERS[sampler](denoise, x, timesteps(steps, shift).to(device), callback)
    return ((x0 + 1) / 2).clamp(0, 1)


def _weakened_only_by_weak_keep(guidance: GuidanceConfig | None, tokens: int) -> bool:
    """Whether ``guidance`` is Sparse Guidance whose weak branch differs from the strong one only by seeing fewer
    reference tokens (``weak_keep``) on a model of ``tokens`` target tokens."""
    return isinstance(guidance, SparseGuidanceConfig) and guidance.routes_as_strong(tokens)


def _check_loaded(model: RefDiT) -> None:
    """``ValueError`` unless ``model``'s parameters and buffers hold data: not on the meta device, and the target
    position ids (``target_ids``, made at construction, not loaded with the weights) intact."""
    params = [name for name, p in model.named_parameters() if p.is_meta]
    if params:
        raise ValueError(f"model (a RefDiT) has its weights on the meta device (not loaded): {len(params)} of its "
                         f"{len(list(model.parameters()))} parameters, e.g. {params[0]}; build it on a real device "
                         "(not under torch.device('meta')) and load its weights (ts.load_model, or "
                         "model.load_state_dict(state))")
    grid = model.config.grid
    if model.target_ids.is_meta or not torch.equal(model.target_ids.cpu(), grid_ids(0, grid, grid)):
        problem = ("on the meta device" if model.target_ids.is_meta else
                   "holding other values than the target's position ids (to_empty() leaves it uninitialised)")
        raise ValueError(f"model (a RefDiT) has its buffer target_ids {problem}: it is made when the model is built, "
                         "not loaded with the weights; build the RefDiT on a real device (not under "
                         "torch.device('meta')), then load its weights with model.load_state_dict(state)")


def _checked_guidance(model: RefDiT, guidance: GuidanceConfig) -> GuidanceConfig:
    """A re-validated copy (fields edited after construction are checked again); routing needs a route span."""
    if not isinstance(guidance, (CFGConfig, SparseGuidanceConfig)):
        raise TypeError(f"guidance must be a CFGConfig or SparseGuidanceConfig, got {type(guidance).__name__}")
    guidance = dataclasses.replace(guidance)
    if any(b.gamma > 0 for b in guidance.branches()) and model.config.route_span is None:
        raise ValueError("this guidance routes tokens (strong/weak > 0), which needs a model built with "
                         "route_span (e.g. refdit-routed)")
    n = model.config.grid ** 2  # routed rates drop round(rate * n) of the n target tokens; one must stay
    for name in ("strong", "weak") if isinstance(guidance, SparseGuidanceConfig) else ():
        rate = getattr(guidance, name)
        if n - int(round(rate * n)) < 1:
            raise ValueError(f"guidance {name}={rate} routes all {n} target tokens of this model around its route "
                             f"span; give a rate below {1 - 0.5 / n:.4g}")
    if isinstance(guidance, SparseGuidanceConfig) and guidance.weak_is_strong(n):  # the config's check, on this grid
        raise ValueError(f"guidance strong={guidance.strong} and weak={guidance.weak} both route "
                         f"{round(guidance.weak * n)} of this model's {n} target tokens, so the weak branch is the "
                         "strong one (guidance would do nothing, or only differ by which tokens are drawn): set them "
                         f"further apart (a step of {1 / n:.3g} is one token), weak_keep < 1 or null_weak")
    return guidance
