"""A small image feature network trained on the task suite, for FID on our own images.

Inception features (the usual FID) need downloaded weights and know nothing of 32 px procedural images, so
FID here uses :class:`FeatureNet`: a four-layer CNN trained to say which prompt words an image shows (a
multi-label, bag-of-words objective over the target images of every task, including the prompt-only
``scene`` task). Its globally pooled penultimate features (``num_features`` = 64) describe colours,
patterns, textures and objects independent of where they are. The trained weights ship as
``tokensparse/weights/features.safetensors``; :func:`tokensparse.metrics.fid` uses them.

    python -m tokensparse.features --steps 1500 --out src/tokensparse/weights/features.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import checks
from .files import folder_problem
from .vocab import VOCAB_SLOTS, tokenize

FEATURES_FILE = "features.safetensors"


class FeatureNet(nn.Module):
    """Image ``(B, 3, H, W)`` in [0, 1] -> features ``(B, num_features)`` (any H, W >= 8)."""

    def __init__(self, width: int = 16, num_words: int = VOCAB_SLOTS) -> None:
        super().__init__()
        w = width
        self.num_features = 4 * w
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_words)

    def forward(self, images: Tensor) -> Tensor:
        """Features; ``torchmetrics``' FID calls this."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FeatureNet expects (B, 3, H, W) images, got {tuple(images.shape)}")
        return self.body(images.float() * 2 - 1)

    def logits(self, images: Tensor) -> Tensor:
        """Per-word logits ``(B, num_words)`` (the training objective)."""
        return self.head(self(images))


def word_targets(prompts: list[str]) -> Tensor:
    """Multi-hot ``(B, VOCAB_SLOTS)`` of the words in each prompt (padding id 0 left out)."""
    ids = tokenize(prompts)
    out = torch.zeros(len(prompts), VOCAB_SLOTS)
    out.scatter_(1, ids, 1.0)
    out[:, 0] = 0.0
    return out


def load_feature_net(path: str | Path | None = None) -> FeatureNet:
    """The shipped feature network (or one saved at ``path``), in eval mode, gradients off."""
    from .models.zoo import weights_dir

    path = Path(path) if path is not None else weights_dir() / FEATURES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"feature network weights {path} not found (train them: python -m tokensparse.features)")
    net = FeatureNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval().requires_grad_(False)


def train_feature_net(steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                      image_size: int = 32, log=print) -> tuple[FeatureNet, dict]:
    """Train on targets of every task (training seeds only); returns the net and held-out word accuracy.

    ``steps`` and ``batch_size`` are ints >= 1, ``lr`` > 0 (``ValueError`` / ``TypeError`` naming them: ``steps=0``
    was a ``ValueError`` from the LR schedule about "total_steps")."""
    from .data import ALL_FAMILIES, heldout, train_batches

    steps = checks.integer("steps", steps, lo=1)
    batch_size = checks.integer("batch_size", batch_size, lo=1)
    lr = checks.real("lr", lr, 0.0, lo_open=True)
    torch.manual_seed(seed)
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batches = train_batches(batch_size, image_size, seed=seed + 101, tasks=list(ALL_FAMILIES))
    t0 = time.time()
    for step in range(steps):
        b = next(batches)
        loss = F.binary_cross_entropy_with_logits(net.logits(b.target), word_targets(b.prompts))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    net.eval()
    recall = {}
    with torch.no_grad():
        for fam in ALL_FAMILIES:
            samples = heldout(fam, 128, image_size)
            logits = net.logits(torch.stack([s.target for s in samples]))
            truth = word_targets([s.prompt for s in samples])
            k = truth.sum(1, keepdim=True).long()  # a prompt's k words vs the net's top k
            ranks = logits.argsort(1, descending=True).argsort(1)
            recall[fam] = float(((ranks < k) & (truth > 0)).sum() / truth.sum())
    return net, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "image_size": image_size,
                 "wall_s": time.time() - t0, "heldout_word_recall_at_k": recall}


def save_feature_net(net: FeatureNet, path: str | Path, meta: dict) -> None:
    """Weights (float16 safetensors) and a provenance JSON beside them, both written atomically."""
    from .models.zoo import write_shipped

    half = {k: v.half().contiguous() for k, v in net.state_dict().items()}
    write_shipped(path, lambda tmp: save_file(half, tmp), meta)


def main(argv: list[str] | None = None) -> None:
    """``python -m tokensparse.features``: train the guidance benchmark's feature network.

    Bad flags (``--steps 0``, an ``--out`` that is not a ``.safetensors`` path or cannot be written) are refused
    before training, and a write that fails after it is one line (exit 1), not a traceback."""
    ap = argparse.ArgumentParser(description="Train the FID feature network on the task suite.")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("src/tokensparse/weights") / FEATURES_FILE)
    args = ap.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    if args.out.suffix.lower() != ".safetensors":
        ap.error(f"--out must be a .safetensors path, got {args.out}")
    for target in (args.out, args.out.with_suffix(".json")):
        if target.is_dir():
            ap.error(f"--out {args.out}: {target} is a folder")
    problem = folder_problem(args.out.absolute().parent)
    if problem is not None:
        ap.error(f"--out {args.out}: {problem}")
    net, meta = train_feature_net(args.steps, args.batch_size)
    try:
        save_feature_net(net, args.out, meta)
    except OSError as exc:  # names the path; the folder was checked above, so a full disk or a vanished folder
        ap.exit(1, f"{ap.prog}: error: {exc}\n")
    print(json.dumps(meta["heldout_word_recall_at_k"]), f"wrote {args.out}")


if __name__ == "__main__":  # pragma: no cover
    main()
