"""Image decoding and the train/eval transforms, callable in memory (benchmarks, prediction).

bytes -> RGB uint8 [S, S, 3] -> optional horizontal flip -> uint8 [B, S, S, 3] batch ->
`normalize` -> float32 [B, 3, S, S] with the ImageNet mean/std. The stream's workers stop at the
uint8 batch and the consumer normalises (see `stream.py`): the float batch is 4x the bytes, both
across processes and from host to GPU, so the trainer copies uint8 to the device and normalises
there (`trainer/prefetch.py`).

Choices and their costs:
- JPEG draft mode. `Image.draft("RGB", (S, S))` lets libjpeg decode at 1/2, 1/4 or 1/8 scale
  (DCT scaling) while keeping both sides >= S, so a 1024px photo resized to 224 decodes a quarter
  of the pixels: several times cheaper for OpenImages-size photos, nothing to gain when the
  source is under twice the target size (`bench/decode_cost.py`; figures in bench/RESULTS.md).
  The result differs from a full decode by small interpolation noise.
- Squash resize to (S, S), aspect ratio not kept, as the public reference code for the CSL paper
  does (multi-label: a centre crop could cut away the very object a positive label names).
  Bilinear with PIL's antialiasing on downscale.
- Only JPEG, PNG and WebP parsers are allowed: PIL's other plugins (EPS calls Ghostscript, and
  several exotic formats have a history of parser bugs) have no business reading shard bytes.
  Any failure to decode, including decompression bombs, becomes `ImageDecodeError`, which the
  stream handles under its corrupt-sample policy.
- Normalisation is one uint8 -> float32 copy and an in-place multiply-add with per-channel
  scale 1/(255 std) and shift -mean/std (cheaper than a lookup table or
  permute().float().sub().div()). It runs on whatever device the tensor is on, with the two
  constants cached per device, so a GPU batch costs no host-to-device copy and no sync.
  `channels_last=True` keeps the pixels' NHWC order in memory: a straight copy instead of a
  transpose, and the layout NHWC convolutions want.
- Flips are applied by PIL right after the resize (`decode_image(..., flip=True)`): cheaper
  than copying a reversed numpy view of 3-byte pixels (`bench/decode_cost.py`).
- Flips are a pure function of (seed, epoch, shard, sample index) through a splitmix64 hash,
  vectorised per batch: independent of rank, worker and resume point, so a resumed stream
  yields bit-identical tensors. EXIF orientation is not applied (as in torchvision's loader).
- Training augmentation (Cutout, RandAugment: `augment.py`) is `decode_image`'s `transform`,
  run on the PIL image after the flip, so the pixels leave PIL once.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where a tensor is made: decoding alone (verify's tasks) never loads it
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDecodeError",
    "decode_image",
    "decode_images",
    "flip_mask",
    "normalize",
    "sample_hash",
    "to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FORMATS = ("JPEG", "PNG", "WEBP")


class ImageDecodeError(ValueError):
    """Image bytes that PIL cannot (or must not) decode."""


def decode_image(data: bytes, size: int, *, draft: bool = True, flip: bool = False,
                 transform: Callable[[Image.Image], Image.Image] | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 [size, size, 3] RGB, squashed to a square, mirrored if `flip`, then
    `transform` (training augmentation, `augment.py`) on the PIL image: one PIL round trip."""
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as im:
            if draft and im.format == "JPEG":
                im.draft("RGB", (size, size))
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            if flip:  # PIL's transpose: cheaper than numpy's copy of a reversed 3-byte-pixel view
                rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if transform is not None:
                rgb = transform(rgb)
            return np.asarray(rgb)
    except Exception as e:  # noqa: BLE001 - hostile bytes make PIL raise almost anything
        raise ImageDecodeError(f"cannot decode image ({type(e).__name__}: {e})") from None


def decode_images(images: Sequence[bytes], size: int, *, draft: bool = True) -> np.ndarray:
    """Decode a batch; raises ImageDecodeError on the first bad image (callers that need a
    per-sample policy call `decode_image` themselves)."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = decode_image(data, size, draft=draft)
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_hash(seed: int, epoch: int, shards: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """uint64 per sample, a pure function of (seed, epoch, shard index, sample index)."""
    with np.errstate(over="ignore"):
        h = _mix(np.full(len(indices), seed & (2**64 - 1), dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        for part in (np.uint64(epoch & (2**64 - 1)), np.asarray(shards, dtype=np.uint64),
                     np.asarray(indices, dtype=np.uint64)):
            h = _mix(h ^ part)
    return h


def flip_mask(seed: int, epoch: int, shards: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per-sample coin flips: the top bit of `sample_hash`."""
    return (sample_hash(seed, epoch, shards, indices) >> np.uint64(63)).astype(bool)


@functools.lru_cache(maxsize=None)
def _scale_shift(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (1.0 / (255.0 * std)).to(device), (mean / std).to(device)


def normalize(images: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, S, S, 3] (any device) -> float32 [B, 3, S, S], ImageNet-normalised, on the same
    device; contiguous, or channels_last (the input's own memory order) when asked."""
    import torch

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize needs uint8 [B, S, S, 3], got {images.dtype} {list(images.shape)}")
    scale, shift = _scale_shift(images.device)
    b, h, w, _ = images.shape
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=images.device, memory_format=layout)
    out.copy_(images.permute(0, 3, 1, 2))
    return out.mul_(scale).sub_(shift)


def to_tensor(images: np.ndarray, flip: np.ndarray | None = None) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S], flipped where `flip`, ImageNet-normalised."""
    import torch

    if flip is not None and flip.any():
        images = images.copy()
        images[flip] = images[flip][:, :, ::-1]
    return normalize(torch.from_numpy(np.ascontiguousarray(images)))
