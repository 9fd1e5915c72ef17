"""Benchmark: what JPEG draft mode and PIL flips save in the training decode (`data_shards/decode.py`).

    .venv/bin/python bench/decode_cost.py [--repeat 30]

The real photos in ../shared/data/openimages/images are re-encoded at OpenImages' original
sizes (1600x1067, 1024x683; quality 90), then decoded to 224 and 448 by `decode_image` with
`draft=True` (libjpeg's DCT scaling, the default) and `draft=False`, one core, median of
`--repeat` rounds over every photo. Also: a horizontal flip done by PIL during decode against
copying a reversed numpy view of the decoded 224x224 pixels. Prints ms per image and the ratio
of the two ways, both measured in this run.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main"]

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "openimages" / "images"


def _median_ms(fn, items, repeat: int) -> float:
    rounds = []
    for _ in range(repeat):
        t = time.perf_counter()
        for x in items:
            fn(x)
        rounds.append((time.perf_counter() - t) / len(items) * 1e3)
    return statistics.median(rounds)


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from PIL import Image

    from data_shards.decode import decode_image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    photos = sorted(PHOTOS.glob("*.jpg"))
    if not photos:
        print(f"no photos in {PHOTOS}: the shared OpenImages folder is absent", file=sys.stderr)
        return 2
    print(f"{len(photos)} photos from {PHOTOS}, median of {args.repeat} rounds, ms per image on one core")
    for w, h in ((1600, 1067), (1024, 683)):
        blobs = []
        for p in photos:
            buf = io.BytesIO()
            Image.open(p).convert("RGB").resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
        for size in (224, 448):
            full = _median_ms(lambda b: decode_image(b, size, draft=False), blobs, args.repeat)
            draft = _median_ms(lambda b: decode_image(b, size, draft=True), blobs, args.repeat)
            print(f"  {w}x{h} -> {size}: full decode {full:.2f} ms, draft {draft:.2f} ms: {full / draft:.2f}x")
    small = []
    for p in photos:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, "JPEG", quality=90)
        small.append(buf.getvalue())
    decoded = [decode_image(b, 224) for b in small]
    numpy_flip = _median_ms(lambda a: np.ascontiguousarray(a[:, ::-1]), decoded, args.repeat * 10)
    plain = _median_ms(lambda b: decode_image(b, 224), small, args.repeat)
    pil = _median_ms(lambda b: decode_image(b, 224, flip=True), small, args.repeat)
    print(f"  flip of a 224x224 image: numpy reversed-view copy {numpy_flip:.3f} ms; "
          f"PIL during decode {max(pil - plain, 0.0):.3f} ms (decode with flip {pil:.2f} - without {plain:.2f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
