"""Using a checkpoint: evaluation, prediction and export, in one process.

What a checkpoint folder holds is `checkpoint.py`'s business; everything here reads its
`csl_state.json` (step, class list, resolved config) and ONE weights file (`ema.safetensors` or
the consolidated fp32 `model.safetensors`), by URL, local or s3://: never DeepSpeed's state,
never the folder. So it needs neither DeepSpeed nor the world size the run had.

`weights="ema"` (the default when the run kept an EMA) uses the averaged weights, which is what
the papers evaluate; `weights="model"` the raw ones.

Evaluation keeps only annotated entries (class, score, label), never a dense N x C score
matrix, so its memory follows the annotations (about 7 per image on OpenImages).

Device (`device="auto"`: CUDA when torch sees one). On a GPU the model runs under bf16
autocast (the precision it was trained in) and batches cross as uint8 from page-locked memory,
normalised on the GPU (`trainer/prefetch.py`, the training path's own prefetcher): a quarter
of the host-to-device bytes, the next copy overlapping the current batch. On CPU the same code
runs in fp32 without pinning. Asking for CUDA where there is none is bad usage (ValueError),
never a silent fall-back to a CPU run orders of magnitude slower.

Decoding is the bottleneck of a GPU evaluation (a JPEG costs a core milliseconds; ResNet-50
in bf16 scores thousands of images per second), so `default_workers` gives the loader every
CPU this process may run on but one, the one feeding the GPU. On CPU the model needs the
cores more than decoding does (a forward costs many times a decode), so it gets three in four.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from typing import Any, Literal, Sequence

import numpy as np
import torch

from data_shards.format import ClassInfo
from data_shards.storage import read_bytes, read_manifest, write_bytes_atomic

from .checkpoint import has_ema, read_state, read_weights, resolve_checkpoint
from .config import Config

__all__ = ["LoadedModel", "autocast", "default_workers", "evaluate_checkpoint", "export_checkpoint", "load_checkpoint",
           "predict", "resolve_device"]

Weights = Literal["ema", "model", "auto"]
Device = Literal["auto", "cuda", "cpu"]


def resolve_device(device: str) -> torch.device:
    """`auto`: CUDA when torch sees a device, else CPU. `cuda` without one is a ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA device is visible to torch here (use --device cpu or auto)")
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device {device!r}: use auto, cuda or cpu")


def default_workers(device: torch.device, cpus: int | None = None) -> int:
    """Loader processes for `device` (see the module docstring): on CUDA every CPU of this
    process's affinity mask but one; on CPU a quarter of them; at least 1."""
    n = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, n - 1) if device.type == "cuda" else max(1, n // 4)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU, nothing (fp32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LoadedModel:
    def __init__(self, model: torch.nn.Module, cfg: Config, classes: list[ClassInfo], checkpoint: str, weights: str, step: int):
        self.model, self.cfg, self.classes = model, cfg, classes
        self.checkpoint, self.weights, self.step = checkpoint, weights, step


def load_checkpoint(checkpoint: str, weights: Weights = "auto") -> LoadedModel:
    """Rebuild the model of a run folder's latest complete checkpoint (or of one checkpoint)."""
    from .models import build_model, channels_last

    ckpt = resolve_checkpoint(checkpoint)
    state = read_state(ckpt)
    cfg = Config.model_validate(state["config"])
    classes = [ClassInfo.model_validate(c) for c in state["classes"]]
    model = build_model(cfg.model.model_copy(update={"pretrained": None}), len(classes))
    if weights == "auto":
        weights = "ema" if has_ema(ckpt) else "model"
    sd = read_weights(ckpt, weights)
    # The writers save every buffer, non-persistent ones too (TResNet's anti-aliasing filters):
    # they are constants the model already holds, not weights that fail to fit.
    constants = {name for name, _ in model.named_buffers()} - model.state_dict().keys()
    sd = {k: v for k, v in sd.items() if k not in constants}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: weights do not fit model {cfg.model.name!r} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    if cfg.model.channels_last:
        channels_last(model)  # faster inference; weights were saved contiguous
    return LoadedModel(model, cfg, classes, ckpt, weights, int(state["step"]))


def evaluate_checkpoint(
    checkpoint: str, data: str, split: str = "val", *, weights: Weights = "auto", batch_size: int = 64,
    workers: int | None = None, per_class_csv: str | None = None, device: Device | str = "auto",
) -> dict[str, Any]:
    """mAP of a checkpoint over a split; `workers=None`: `default_workers(device)`."""
    from data_shards.partition import num_batches
    from data_shards.stream import ShardStream

    from .loop import evaluate
    from .prefetch import DevicePrefetcher

    dev = resolve_device(device)
    lm = load_checkpoint(checkpoint, weights)
    manifest = read_manifest(data)
    if [c.id for c in manifest.classes] != [c.id for c in lm.classes]:
        raise ValueError(f"{data}: class list differs from the checkpoint's ({manifest.num_classes} vs {len(lm.classes)} classes)")
    samples = sum(s.samples for s in manifest.split(split).shards)
    if workers is None:  # batch i goes to worker i % workers: more workers than batches would idle
        workers = min(default_workers(dev), max(1, num_batches(samples, 1, batch_size)))
    stream = ShardStream(data, split, batch_size=batch_size, image_size=lm.cfg.data.image_size, num_workers=workers,
                         shuffle=False, train_transform=False, manifest=manifest, output="uint8",
                         pin_memory=dev.type == "cuda", persistent_workers=False)
    model = lm.model.to(dev)
    t0 = time.perf_counter()
    with autocast(dev):
        acc = evaluate(model, DevicePrefetcher(stream, dev, channels_last=lm.cfg.model.channels_last), dev, torch.float32)
    seconds = time.perf_counter() - t0
    res = acc.compute()
    out = {"checkpoint": lm.checkpoint, "weights": lm.weights, "step": lm.step, "data": data, "split": split,
           "map_c": float(res["map_c"]), "map_o": float(res["map_o"]), "num_valid": int(res["num_valid"]),
           "samples": samples, "device": dev.type, "workers": workers, "seconds": round(seconds, 3),
           "images_per_s": round(samples / seconds, 1) if seconds > 0 else None}
    if per_class_csv:
        buf = io.StringIO()
        buf.write("class_id,name,ap,pos,neg\n")
        for c, ap, p, n in zip(manifest.classes, res["ap"], res["pos"], res["neg"]):
            buf.write(f"{c.id},\"{c.name}\",{'' if np.isnan(ap) else f'{ap:.4f}'},{int(p)},{int(n)}\n")
        write_bytes_atomic(per_class_csv, buf.getvalue().encode())
    return out


def _read_image(path: str, size: int) -> np.ndarray:
    from data_shards.decode import ImageDecodeError, decode_image

    try:
        return decode_image(read_bytes(path), size)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except ImageDecodeError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


@torch.no_grad()
def predict(lm: LoadedModel, images: Sequence[str], top_k: int = 5, *, device: Device | str = "auto",
            workers: int | None = None, batch_size: int = 64) -> list[dict[str, Any]]:
    """Top-k classes per image, in the order given. Images are read and decoded by `workers`
    threads (PIL and fsspec release the GIL; a few files do not pay for processes), the next
    batch while the current one is scored on `device`, normalised there from uint8."""
    from concurrent.futures import ThreadPoolExecutor

    from data_shards.decode import normalize

    dev = resolve_device(device)
    model = lm.model.to(dev).eval()
    size = lm.cfg.data.image_size
    threads = workers if workers is not None else default_workers(dev)
    k = min(top_k, len(lm.classes))
    chunks = [list(images[lo:lo + batch_size]) for lo in range(0, len(images), batch_size)]
    out = []
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="predict-decode") as pool:
        def read(paths: list[str]) -> list[Any]:
            return [pool.submit(_read_image, p, size) for p in paths]

        ahead = read(chunks[0]) if chunks else []
        for i, paths in enumerate(chunks):
            batch = torch.from_numpy(np.stack([f.result() for f in ahead]))
            ahead = read(chunks[i + 1]) if i + 1 < len(chunks) else []  # memory: two batches at most
            x = normalize(batch.to(dev, non_blocking=True), channels_last=lm.cfg.model.channels_last)
            with autocast(dev):
                probs = model(x).float().sigmoid()
            scores, idx = probs.topk(k, dim=1)
            for path, s_row, i_row in zip(paths, scores.tolist(), idx.tolist()):
                out.append({"image": path, "top": [{"class_id": lm.classes[i].id, "name": lm.classes[i].name,
                                                    "score": round(float(s), 4)} for s, i in zip(s_row, i_row)]})
    return out


def export_checkpoint(checkpoint: str, out: str, weights: Weights = "auto") -> dict[str, Any]:
    """One fp32 safetensors file (ZeRO shards consolidated) plus `<out stem>.classes.json`."""
    from safetensors.torch import save

    lm = load_checkpoint(checkpoint, weights)
    sd = {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v.detach().contiguous()
          for k, v in lm.model.state_dict().items()}
    meta = {"model": lm.cfg.model.name, "head": lm.cfg.model.head, "image_size": str(lm.cfg.data.image_size),
            "num_classes": str(len(lm.classes)), "weights": lm.weights, "step": str(lm.step)}
    write_bytes_atomic(out, save(sd, metadata=meta))
    stem = out[: -len(".safetensors")] if out.endswith(".safetensors") else out
    classes_path = stem + ".classes.json"
    write_bytes_atomic(classes_path, json.dumps([c.model_dump() for c in lm.classes], indent=1).encode())
    return {"out": out, "classes": classes_path, "tensors": len(sd), "weights": lm.weights, "step": lm.step}
