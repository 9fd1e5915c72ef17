"""Using a checkpoint: evaluation, prediction and export, in one process.

What a checkpoint folder holds is `checkpoint.py`'s business; everything here reads its
`csl_state.json` (step, class list, resolved config) and ONE weights file (`ema.safetensors` or
the consolidated fp32 `model.safetensors`), by URL, local or s3://: never DeepSpeed's state,
never the folder. So it needs neither DeepSpeed nor the world size the run had.

`weights="ema"` (the default when the run kept an EMA) uses the averaged weights, which is what
the papers evaluate; `weights="model"` the raw ones.

Evaluation keeps only annotated entries (class, score, label), never a dense N x C score
matrix, so its memory follows the annotations (about 7 per image on OpenImages).
"""

from __future__ import annotations

import io
import json
from typing import Any, Literal, Sequence

import numpy as np
import torch

from data_shards.format import ClassInfo
from data_shards.storage import read_bytes, read_manifest, write_bytes_atomic

from .checkpoint import has_ema, read_state, read_weights, resolve_checkpoint
from .config import Config

__all__ = ["LoadedModel", "load_checkpoint", "evaluate_checkpoint", "predict", "export_checkpoint"]

Weights = Literal["ema", "model", "auto"]


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
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: weights do not fit model {cfg.model.name!r} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    if cfg.model.channels_last:
        channels_last(model)  # faster inference; weights were saved contiguous
    return LoadedModel(model, cfg, classes, ckpt, weights, int(state["step"]))


def evaluate_checkpoint(
    checkpoint: str, data: str, split: str = "val", *, weights: Weights = "auto", batch_size: int = 64,
    workers: int = 2, per_class_csv: str | None = None,
) -> dict[str, Any]:
    from data_shards.stream import ShardStream

    from .loop import evaluate

    lm = load_checkpoint(checkpoint, weights)
    manifest = read_manifest(data)
    if [c.id for c in manifest.classes] != [c.id for c in lm.classes]:
        raise ValueError(f"{data}: class list differs from the checkpoint's ({manifest.num_classes} vs {len(lm.classes)} classes)")
    stream = ShardStream(data, split, batch_size=batch_size, image_size=lm.cfg.data.image_size, num_workers=workers,
                         shuffle=False, train_transform=False, manifest=manifest)
    acc = evaluate(lm.model, stream, torch.device("cpu"), torch.float32)
    res = acc.compute()
    out = {"checkpoint": lm.checkpoint, "weights": lm.weights, "step": lm.step, "data": data, "split": split,
           "map_c": float(res["map_c"]), "map_o": float(res["map_o"]), "num_valid": int(res["num_valid"]),
           "samples": sum(s.samples for s in manifest.split(split).shards)}
    if per_class_csv:
        buf = io.StringIO()
        buf.write("class_id,name,ap,pos,neg\n")
        for c, ap, p, n in zip(manifest.classes, res["ap"], res["pos"], res["neg"]):
            buf.write(f"{c.id},\"{c.name}\",{'' if np.isnan(ap) else f'{ap:.4f}'},{int(p)},{int(n)}\n")
        write_bytes_atomic(per_class_csv, buf.getvalue().encode())
    return out


@torch.no_grad()
def predict(lm: LoadedModel, images: Sequence[str], top_k: int = 5) -> list[dict[str, Any]]:
    from data_shards.decode import ImageDecodeError, decode_image, to_tensor

    out = []
    size = lm.cfg.data.image_size
    for path in images:
        try:
            arr = decode_image(read_bytes(path), size)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {path}") from None
        except ImageDecodeError as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
        x = to_tensor(arr[None], np.zeros(1, dtype=bool))
        probs = lm.model(x).float().sigmoid()[0]
        k = min(top_k, probs.numel())
        scores, idx = probs.topk(k)
        out.append({"image": path, "top": [{"class_id": lm.classes[i].id, "name": lm.classes[i].name, "score": round(float(s), 4)}
                                            for s, i in zip(scores.tolist(), idx.tolist())]})
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
