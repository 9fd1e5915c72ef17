"""Benchmark: bytes a checkpoint stores per parameter, and bytes a reader fetches per byte it needs.

    .venv/bin/python bench/checkpoint_size.py [--model small-cnn]

What it measures, on real checkpoints written by `trainer.checkpoint.save_checkpoint` (the
training path) for a tiny untrained model at ZeRO 0 fp32 and ZeRO 1 bf16, both with the EMA on:
- bytes per parameter of each part (DeepSpeed's files, `ema.safetensors`, `model.safetensors`,
  the small rest) and of the whole folder; the per-parameter rates then give the sizes for the
  ResNet-50 and TResNet-M presets (parameter counts from cluster/README.md) - computed, not
  measured;
- `csl export`'s bytes read from storage (`storage.read_bytes`, counted) per byte of the one
  weights file it needs, for the EMA (default) and the raw model.
Bars (issue 14): <= 18 bytes/param with EMA in bf16 training; export reads <= 1.1x its file.
A tiny model inflates per-parameter overheads (JSON state, DeepSpeed's metadata); the rates
are upper bounds for the large models.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]

PRESET_PARAMS = {"ResNet-50 preset": 47.4e6, "TResNet-M preset": 53.2e6}  # cluster/README.md


def _sizes(folder: Path) -> dict[str, int]:
    from trainer.checkpoint import DS_TAG, EMA_FILE, MODEL_FILE

    out = {"deepspeed": 0, "ema": 0, "model": 0, "rest": 0}
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).parts
        key = ("deepspeed" if rel[0] in (DS_TAG, "latest") else
               "ema" if rel[0] == EMA_FILE else "model" if rel[0] == MODEL_FILE else "rest")
        out[key] += p.stat().st_size
    return out


def _write(folder: Path, model: str, stage: int, precision: str) -> int:
    import torch

    from trainer.checkpoint import save_checkpoint
    from trainer.config import load_config
    from trainer.engine import setup_engine
    from trainer.models import build_model

    cfg = load_config("synthetic-cpu", [f"model.name={model}", f"deepspeed.zero_stage={stage}",
                                        f"train.precision={precision}", "train.ema_decay=0.99"])
    torch.manual_seed(0)
    net = build_model(cfg.model, 100)
    params = sum(p.numel() for p in net.parameters())
    engine = setup_engine(net, cfg, world_size=1, total_steps=10)
    loss = engine.forward(torch.randn(2, 3, 32, 32)).float().square().mean()
    engine.backward(loss)
    engine.step()
    engine.update_ema(1)
    state = {"step": 1, "stream": {}, "world_size": 1, "classes": [{"id": str(i), "name": str(i)} for i in range(100)],
             "config": cfg.model_dump(mode="json")}
    folder.mkdir(parents=True)
    save_checkpoint(engine, str(folder), 0, state)
    return params


def _export_reads(folder: Path, weights: str, out: str) -> tuple[int, int]:
    import data_shards.storage as storage
    import trainer.checkpoint as checkpoint
    from trainer.checkpoint import EMA_FILE, MODEL_FILE
    from trainer.inference import export_checkpoint

    real, total = storage.read_bytes, [0]

    def counting(url: str) -> bytes:
        data = real(url)
        total[0] += len(data)
        return data

    storage.read_bytes = checkpoint.read_bytes = counting
    try:
        export_checkpoint(str(folder), out, weights)  # type: ignore[arg-type]
    finally:
        storage.read_bytes = checkpoint.read_bytes = real
    need = (folder / (EMA_FILE if weights == "ema" else MODEL_FILE)).stat().st_size
    return total[0], need


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small-cnn")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="csl-ckpt-bench-"))
    print(f"checkpoint bytes per parameter ({args.model}, EMA on; written by trainer.checkpoint.save_checkpoint)")
    ok = True
    for stage, precision in ((0, "fp32"), (1, "bf16")):
        folder = tmp / f"z{stage}-{precision}"
        params = _write(folder, args.model, stage, precision)
        sizes = _sizes(folder)
        per = {k: v / params for k, v in sizes.items()}
        whole = sum(sizes.values()) / params
        print(f"  ZeRO {stage} {precision}: {params:,} params; " + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
              + f"; total {whole:.2f} B/param")
        for name, n in PRESET_PARAMS.items():
            print(f"    {name} ({n / 1e6:.1f}M params): ~{whole * n / 1e9:.2f} GB per checkpoint (computed)")
        if precision == "bf16":
            passed = whole <= 18
            ok &= passed
            print(f"    bar <= 18 B/param with EMA in bf16 training: {'PASS' if passed else 'FAIL'} ({whole:.2f})")
        for weights in ("ema", "model"):
            read, need = _export_reads(folder, weights, str(tmp / f"{folder.name}-{weights}.safetensors"))
            passed = read <= 1.1 * need
            ok &= passed
            print(f"    csl export --weights {weights}: read {read:,} B for a {need:,} B file = {read / need:.3f} "
                  f"(bar <= 1.1: {'PASS' if passed else 'FAIL'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
