"""Seeded augmentation on the student side, applied before the loader: the teacher is asked about
exactly the views the student trains on.

Lucas Beyer, Xiaohua Zhai, Amélie Royer, Larisa Markeeva, Rohan Anil, Alexander Kolesnikov (2022),
"Knowledge distillation: A good teacher is patient and consistent", CVPR 2022, arXiv:2106.05237:
distillation works best as "function matching": teacher and student see the same, aggressively
augmented view of each image, over many epochs. Here:

    batches = augmented_batches(shuffled_batches(x, y, 64, seed=epoch), Augmentation.parse(
        "shift+mixup"), seed=epoch)
    for inputs, labels, targets in SoftTargetLoader(list(batches), teacher, options): ...

- shifts: zero-pad by `max_shift` pixels and crop back at a random offset per sample. Integer
  shifts move pixels without resampling, so MNIST-like images of codes k / 255 stay exact and can
  still travel as uint8 (`SoftTargetLoader(..., input_dtype="uint8")`).
- mixup (Hongyi Zhang, Moustapha Cisse, Yann N. Dauphin, David Lopez-Paz (2018), "mixup: Beyond
  Empirical Risk Minimization", ICLR 2018, arXiv:1710.09412): x = lam x_i + (1 - lam) x_j with one
  lam ~ Beta(a, a) per batch and j a permutation of the batch, as in the authors' code. Mixed
  pixels are not k / 255 codes: send floats (`input_dtype=None`, the loader's default).
- cutmix (Sangdoo Yun, Dongyoon Han, Seong Joon Oh, Sanghyuk Chun, Junsuk Choe, Youngjoon Yoo
  (2019), "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features",
  ICCV 2019, arXiv:1905.04899): a box of area share ~ (1 - lam) is pasted from x_j; lam is then
  the exact share of the sample's own pixels. Pixels are copied, so uint8 still works.

Labels of mixed batches: `augmented_batches` yields an empty label mapping for them, so
`MultiTaskKDLoss` (and `HintonKDLoss`) train those batches by pure distillation (alpha = 1). A
mixed image has no single hard label, and the teacher was asked about that very image: its soft
targets are the right target, which is Beyer et al.'s function matching (their best students use
no hard labels at all). Mixing the two labels' cross entropies (lam CE(y_i) + (1 - lam) CE(y_j))
would train on what the image was built from rather than on what it shows; `AugmentedBatch` keeps
`labels`, `partner` and `weight` for a caller who wants that anyway. Shift-only batches keep their
labels.

No cache with augmentation: `SoftTargetCache` keys rows by the content of each sample, and every
augmented view is new (a fresh shift, partner and lam per epoch), so a cache would only store rows
that are never asked for again. Pass no `cache=` to the loader when augmenting.

Reproducible: the same `seed` and the same batches give the same views, bit for bit; a new seed
(e.g. one per epoch) gives new views.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "shift", "mixup", "cutmix", "shift+mixup", "shift+cutmix")
_STREAM = 0xA06  # keeps augmentation draws apart from a shuffle seeded with the same number


@dataclass(frozen=True)
class Augmentation:
    """What to do to each batch: shift by up to `max_shift` pixels (0: no shift), then `mix`
    ("none", "mixup" or "cutmix") with lam ~ Beta(`mix_alpha`, `mix_alpha`)."""

    max_shift: int = 0
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_shift, int) and self.max_shift >= 0):
            raise ValueError(f"max_shift: must be an int >= 0, got {self.max_shift!r}")
        if self.mix not in ("none", "mixup", "cutmix"):
            raise ValueError(f"mix: expected 'none', 'mixup' or 'cutmix', got {self.mix!r}")
        if not (math.isfinite(self.mix_alpha) and self.mix_alpha > 0):
            raise ValueError(f"mix_alpha: must be a finite number > 0, got {self.mix_alpha!r}")

    @classmethod
    def parse(cls, name: str, max_shift: int = 2, mix_alpha: float = 1.0) -> Augmentation:
        """One of `AUGMENTATIONS` ("none", "shift", "shift+mixup", ...); `max_shift` applies when
        the name has "shift" (2 pixels: a 28x28 digit stays whole). Raises `ValueError`."""
        if name not in AUGMENTATIONS:
            raise ValueError(f"augment: expected one of {', '.join(AUGMENTATIONS)}, got {name!r}")
        parts = set(name.split("+"))
        mix: Literal["none", "mixup", "cutmix"] = (
            "mixup" if "mixup" in parts else "cutmix" if "cutmix" in parts else "none"
        )
        return cls(max_shift if "shift" in parts else 0, mix, mix_alpha)

    @property
    def exact_pixels(self) -> bool:
        """Whether the views keep the input's pixel values (shift, cutmix), so uint8 codes stay
        exact on the wire; mixup makes new values."""
        return self.mix != "mixup"

    @property
    def active(self) -> bool:
        return self.max_shift > 0 or self.mix != "none"


@dataclass(frozen=True)
class AugmentedBatch:
    """One augmented batch. `inputs`: (batch, C, H, W), the input's dtype (float32 after mixup
    of integer inputs). `labels`: each row's own labels, as given. `partner`: (batch,) int64, the
    row mixed into each row, None if not mixed. `weight`: lam in [0, 1], the share of each row's
    own image (mixup) or pixels (cutmix), None if not mixed."""

    inputs: torch.Tensor
    labels: Mapping[str, torch.Tensor]
    partner: torch.Tensor | None = None
    weight: float | None = None

    def training_labels(self) -> dict[str, torch.Tensor]:
        """The labels to train on: all of them, or none for a mixed batch (pure distillation;
        see the module docstring)."""
        return {} if self.partner is not None else dict(self.labels)


def shift(inputs: torch.Tensor, max_shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Each sample of (batch, C, H, W) `inputs` moved by integer offsets in [-max_shift, max_shift]
    (both axes, drawn per sample), the uncovered border zero. Same dtype, exact pixel values."""
    if max_shift == 0:
        return inputs
    batch, _, height, width = inputs.shape
    padded = F.pad(inputs, (max_shift, max_shift, max_shift, max_shift))  # (B, C, H+2s, W+2s)
    offsets = rng.integers(0, 2 * max_shift + 1, size=(batch, 2))
    rows = [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    return torch.stack(rows)  # (B, C, H, W)


def _cutmix_box(
    height: int, width: int, lam: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Yun et al.'s box: sides sqrt(1 - lam) of the image's, centre uniform, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def augment_batch(
    inputs: torch.Tensor | np.ndarray,
    labels: Mapping[str, torch.Tensor],
    augmentation: Augmentation,
    rng: np.random.Generator,
) -> AugmentedBatch:
    """Apply `augmentation` to one (batch, C, H, W) batch with draws from `rng`."""
    x = torch.as_tensor(inputs)
    if x.dim() != 4:
        raise ValueError(f"inputs: expected shape (batch, channels, height, width), got {x.shape}")
    x = shift(x, augmentation.max_shift, rng)
    if augmentation.mix == "none" or len(x) < 2:
        return AugmentedBatch(x, labels)
    lam = float(rng.beta(augmentation.mix_alpha, augmentation.mix_alpha))
    partner = torch.from_numpy(rng.permutation(len(x)))  # (batch,)
    if augmentation.mix == "mixup":
        x = x if x.is_floating_point() else x.to(torch.float32)
        mixed = lam * x + (1.0 - lam) * x[partner]  # (B, C, H, W)
        return AugmentedBatch(mixed, labels, partner, lam)
    height, width = x.shape[2], x.shape[3]
    top, bottom, left, right = _cutmix_box(height, width, lam, rng)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    own = 1.0 - (bottom - top) * (right - left) / (height * width)
    return AugmentedBatch(mixed, labels, partner, own)


def augment_epoch(
    batches: Iterable[tuple[torch.Tensor | np.ndarray, Mapping[str, torch.Tensor]]],
    augmentation: Augmentation,
    seed: int,
) -> Iterator[AugmentedBatch]:
    """`(inputs, labels)` batches -> `AugmentedBatch`es (with each mixed row's partner and
    weight), seeded by `seed`: the views `augmented_batches` yields for the same arguments."""
    rng = np.random.default_rng([_STREAM, seed])
    for inputs, labels in batches:
        yield augment_batch(inputs, labels, augmentation, rng)


def augmented_batches(
    batches: Iterable[tuple[torch.Tensor | np.ndarray, Mapping[str, torch.Tensor]]],
    augmentation: Augmentation,
    seed: int,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """`(inputs, labels)` batches -> augmented `(inputs, training labels)` batches, seeded by
    `seed` (give a new one per epoch for new views). Feed them to `SoftTargetLoader` so the
    teacher answers for these very views; labels are empty for mixed batches (pure KD)."""
    for augmented in augment_epoch(batches, augmentation, seed):
        yield augmented.inputs, augmented.training_labels()
