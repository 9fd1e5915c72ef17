"""Training augmentations: flip, Cutout and RandAugment, drawn per sample from (seed, epoch, shard, index).

The public reference code of the CSL paper trains with `Resize -> CutoutPIL(0.5) -> RandAugment()
-> ToTensor` (no flip). Here the same ops run on the PIL image inside `decode.decode_image`, after
the resize (and our flip), before its one `np.asarray`: one PIL round trip per sample, in the
loader workers, on uint8. They never touch the training process's host path (the workers hand over
uint8 batches) and never run on evaluation or prior-pass streams (`train_transform=False`).

Why on the CPU workers and not as batched tensor ops on the GPU: decode already runs there and
produces PIL images; the ops are a fraction of a 224 px decode (bench/RESULTS.md), and a GPU
version would need per-sample geometric warps and histogram ops (equalize, autocontrast) that
have no batched kernel in torch or timm.

Determinism. Every draw is a function of one 64-bit key per sample,
`decode.sample_hash(seed ^ _SALT, epoch, shard, index)`: independent of rank, worker count and
resume point, like the flips (whose hash uses the unsalted seed), so a resumed run sees the same
pixels. timm's ops draw whether they apply, their magnitude, sign and interpolation from the
module-level name `random` of `timm.data.auto_augment`, and take no generator: for one sample
that name is bound to a `random.Random(key)` (and put back after), which also makes our own
draws. The process's global `random` is never touched, so another thread drawing from it (a
stream read in the training process, `num_workers=0`, beside Ray's threads) can neither change
the pixels nor be changed by them. timm is pinned; a timm whose ops drew elsewhere would make the
pixels differ across worker processes, which tests/test_augment.py checks.

Ops and their choices:
- Cutout: written here (~10 lines, as the reference's `CutoutPIL`): timm's and torchvision's
  `RandomErasing` work on tensors and draw a random area and aspect ratio, not a square of a
  stated side. A square of side `round(fraction * S)` centred uniformly anywhere in the image
  and clipped at its borders (as the reference), filled with one colour, random per image (as
  the reference) or fixed: one `Image.paste` of a colour.
- RandAugment: timm's ops (`timm.data.auto_augment.rand_augment_ops`), configured as the
  reference's `randaugment` package draws them: each of `num_ops` ops applied with probability
  0.5, its magnitude uniform in [0, magnitude] on timm's 0-10 scale (the reference draws levels
  1-9 of 9 uniformly), severity increasing with magnitude, grey (128) fill; posterize keeps 4-8
  bits as in the reference (timm's increasing variant keeps 4-0 bits, so a quarter of posterized
  images would keep one bit under uniform magnitudes). The ops are chosen here with `random`
  (uniform, with replacement, as timm's `RandAugment` does), not through timm's `RandAugment`
  object: it draws its choice from NumPy's global generator, which would have to be seeded,
  and its state saved and restored around every sample: a cost paid per image for nothing.
"""

from __future__ import annotations

import contextlib
import functools
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .decode import flip_mask, sample_hash

__all__ = [
    "REFERENCE",
    "AugmentSpec",
    "Augmenter",
    "CutoutSpec",
    "RandAugmentSpec",
    "augment_keys",
    "cutout",
    "randaugment_ops",
]

_SALT = 0xA5C3_17E9_4D2B_8F61  # keeps augmentation draws independent of the flip bit of the same sample
_GREY = (128, 128, 128)  # the reference's fill for rotate/shear/translate, timm's default too


@dataclass(frozen=True)
class CutoutSpec:
    fraction: float = 0.5  # side of the square as a fraction of the image side ([ref] cutout_factor=0.5)
    fill: tuple[int, int, int] | None = None  # None: a random colour per image, as the reference


@dataclass(frozen=True)
class RandAugmentSpec:
    num_ops: int = 2  # [ref] the randaugment package applies 2 ops
    magnitude: float = 10.0  # upper end of the uniform magnitude draw, timm's 0-10 scale


@dataclass(frozen=True)
class AugmentSpec:
    """What a training stream applies; `AugmentSpec()` is the stream's historical flip-only default."""

    flip: bool = True
    cutout: CutoutSpec | None = None
    randaugment: RandAugmentSpec | None = None


# The reference's training transform: Cutout(0.5) and RandAugment, no flip.
REFERENCE = AugmentSpec(flip=False, cutout=CutoutSpec(), randaugment=RandAugmentSpec())


def augment_keys(seed: int, epoch: int, shards: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """uint64 key per sample, a pure function of (seed, epoch, shard, index)."""
    return sample_hash(seed ^ _SALT, epoch, shards, indices)


def cutout(img: Image.Image, fraction: float, centre: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    """Fill the square of side round(fraction * side) centred at `centre` (x, y), clipped to the
    image, with `colour`; in place, returns `img`."""
    w, h = img.size
    sw, sh = max(1, int(fraction * w + 0.5)), max(1, int(fraction * h + 0.5))
    x0, y0 = centre[0] - sw // 2, centre[1] - sh // 2
    img.paste(colour, (max(0, x0), max(0, y0), min(w, x0 + sw), min(h, y0 + sh)))
    return img


@functools.lru_cache(maxsize=8)
def randaugment_ops(magnitude: float) -> tuple[Callable[[Image.Image], Image.Image], ...]:
    """timm's RandAugment ops as the reference draws them (see the module docstring)."""
    from timm.data.auto_augment import rand_augment_choices, rand_augment_ops

    names = [("PosterizeOriginal" if n == "PosterizeIncreasing" else n)
             for n in rand_augment_choices("default", increasing=True)]
    hparams = {"img_mean": _GREY, "magnitude_std": float("inf")}  # inf: uniform in [0, magnitude]
    return tuple(rand_augment_ops(magnitude=magnitude, prob=0.5, hparams=hparams, transforms=names))


@contextlib.contextmanager
def _draws_from(key: int, timm_module: Any) -> Iterator[random.Random]:
    """A generator seeded with `key`, which timm's ops (if given their module) draw from in the block."""
    rng = random.Random(key)
    if timm_module is None:
        yield rng
        return
    timm_module.random = rng  # the module's `import random`, rebound
    try:
        yield rng
    finally:
        timm_module.random = random


class Augmenter:
    """Per-sample (flip, transform) for a training stream; `transform` is None when only flips apply.

    Build it in the main process (the timm import happens here, before the loader forks).
    """

    def __init__(self, spec: AugmentSpec):
        self.spec = spec
        ra = spec.randaugment
        self._ops = randaugment_ops(float(ra.magnitude)) if ra is not None else ()
        self._num_ops = ra.num_ops if ra is not None else 0
        self._timm: Any = None
        if ra is not None:
            from timm.data import auto_augment

            self._timm = auto_augment

    @property
    def pixels(self) -> bool:
        """Whether anything beyond the flip runs."""
        return self.spec.cutout is not None or self._num_ops > 0

    def __call__(self, img: Image.Image, key: int) -> Image.Image:
        with _draws_from(key, self._timm) as rng:
            c = self.spec.cutout
            if c is not None:
                centre = (rng.randrange(img.size[0]), rng.randrange(img.size[1]))
                colour = c.fill if c.fill is not None else (rng.randrange(256), rng.randrange(256),
                                                            rng.randrange(256))
                img = cutout(img, c.fraction, centre, colour)
            for _ in range(self._num_ops):
                img = self._ops[rng.randrange(len(self._ops))](img)
        return img

    def draws(self, seed: int, epoch: int, shards: Sequence[int], indices: Sequence[int]
              ) -> Iterator[tuple[bool, Callable[[Image.Image], Image.Image] | None]]:
        """(flip, transform) for each sample of a batch, keyed by (shard, index)."""
        sh, ix = np.asarray(shards, dtype=np.int64), np.asarray(indices, dtype=np.int64)
        flips = flip_mask(seed, epoch, sh, ix).tolist() if self.spec.flip else [False] * len(sh)
        if not self.pixels:
            return zip(flips, [None] * len(sh))
        keys = augment_keys(seed, epoch, sh, ix).tolist()
        return zip(flips, [functools.partial(self, key=k) for k in keys])
