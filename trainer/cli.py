"""The `csl` command line: one root, subcommands registered from the modules that own them.

Exit codes are part of the contract (DESIGN.md): 0 success; 1 a failure while running, with a
message saying what and where; 2 bad usage, bad config or bad input file, as one line and no
traceback. Bad input surfaces as `ValueError` (our LabelError, ManifestError, ConfigError,
ConversionError and pydantic's ValidationError all are) or `FileNotFoundError`; the root maps
those to 2 and anything else to 1. `CSL_DEBUG=1` re-raises, for a full traceback.

Heavy imports (torch, ray, deepspeed) happen inside the commands, so `csl --help` is instant
and works as a container health check.
"""

from __future__ import annotations

import json
import os
import sys

import click

from data_shards.cli import shards_app

__all__ = ["app", "main"]

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Train multi-label classifiers on partially annotated data (Class-aware Selective Loss)."""


app.add_command(shards_app)

_overrides = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
_checkpoint = click.option("--checkpoint", required=True, help="a run folder (its latest complete checkpoint) or one checkpoint folder")
_verbose = click.option("--verbose", is_flag=True, help="also stream Ray's worker output and Ray's own records to "
                        "the console (by default they go to the log files the command names)")
_device = click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                       help="auto: the GPU when torch sees one (bf16 autocast), else the CPU (fp32)")
_weights = click.option("--weights", type=click.Choice(["auto", "ema", "model"]), default="auto", show_default=True,
                        help="EMA weights (auto: when the run kept an EMA) or the raw model")


@app.command("train")
@click.option("--config", "config", default="synthetic-cpu", show_default=True, help="a preset name or a YAML file")
@_verbose
@_overrides
def train(config: str, verbose: bool, overrides: tuple[str, ...]) -> None:
    """Train (or resume, with the same run.name) on a Ray cluster with DeepSpeed."""
    from .config import load_config
    from .launch import launch

    metrics = launch(load_config(config, list(overrides)), verbose)
    click.echo(json.dumps(metrics))


@app.command("eval")
@_checkpoint
@click.option("--data", required=True, help="dataset root")
@click.option("--split", default="val", show_default=True)
@_weights
@click.option("--per-class", "per_class", default=None, help="write per-class AP to this CSV")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@_device
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="loader processes decoding [default: on a GPU, this process's CPUs - 1; on CPU, a quarter of them]")
@click.option("--json", "as_json", is_flag=True)
def evaluate(checkpoint, data, split, weights, per_class, batch_size, device, workers, as_json) -> None:
    """mAP(C) and mAP(O) over the annotated labels of a split."""
    from .inference import evaluate_checkpoint

    res = evaluate_checkpoint(checkpoint, data, split, weights=weights, batch_size=batch_size, workers=workers,
                              per_class_csv=per_class, device=device)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"{res['checkpoint']} ({res['weights']} weights, step {res['step']}) on {data} [{split}]: "
                   f"mAP(C) {res['map_c']:.2f}  mAP(O) {res['map_o']:.2f}  over {res['num_valid']} classes, {res['samples']} samples "
                   f"({res['device']}, {res['images_per_s']} images/s)")


@app.command("predict")
@_checkpoint
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@_weights
@_device
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="decoding threads [default: as for csl eval]")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
def predict_cmd(checkpoint, images, top_k, weights, device, workers, batch_size, as_json) -> None:
    """Top-k class names and scores for image files (paths or URLs)."""
    from .inference import load_checkpoint, predict, resolve_device

    resolve_device(device)  # a bad --device is refused before the checkpoint is read
    res = predict(load_checkpoint(checkpoint, weights), images, top_k, device=device, workers=workers,
                  batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(res))
        return
    for r in res:
        click.echo(r["image"])
        for t in r["top"]:
            click.echo(f"  {t['score']:.3f}  {t['name']}  ({t['class_id']})")


@app.command("export")
@_checkpoint
@click.option("--out", required=True, help="output .safetensors (the class list goes beside it as .classes.json)")
@_weights
def export(checkpoint, out, weights) -> None:
    """One fp32 safetensors state dict (ZeRO shards consolidated) plus the class list."""
    from .inference import export_checkpoint

    res = export_checkpoint(checkpoint, out, weights)
    click.echo(f"wrote {res['out']} ({res['tensors']} tensors, {res['weights']} weights, step {res['step']}) and {res['classes']}")


@app.command("prior")
@_checkpoint
@click.option("--data", required=True, help="dataset root")
@click.option("--split", default="train", show_default=True)
@click.option("--out", required=True, help="priors CSV (local or URL); <stem>.json and <stem>.png go beside it")
@_weights
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto: GPU actors when the cluster has GPUs (bf16), else CPU actors")
@click.option("--actors", default=None, type=click.IntRange(min=1),
              help="model actors [default: one per GPU, or one per CPU on a CPU cluster]")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--cpus-per-actor", default=None, type=click.FloatRange(min=0, min_open=True),
              help="[default: the CPUs per GPU of the leanest GPU node; 1 on CPUs]")
@click.option("--gpus-per-actor", default=None, type=click.FloatRange(min=0, min_open=True), help="[default: 1 on GPUs]")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="loader processes decoding per actor [default: CPUs per actor - 1]")
@click.option("--no-progress", is_flag=True)
@click.option("--fresh", is_flag=True, help="discard the records of an unfinished pass beside --out (<stem>.shards/) "
              "and score every shard again")
@click.option("--shard-retries", default=2, show_default=True, type=click.IntRange(min=0),
              help="retries (with back-off) of a shard that fails to read before the pass names it and stops")
def prior(checkpoint, data, split, out, weights, device, actors, batch_size, cpus_per_actor, gpus_per_actor, workers,
          no_progress, fresh, shard_retries) -> None:
    """Label prior (paper 1 eq. 10-11): mean sigmoid output of an Ignore model over a split, on Ray.
    Re-run the same command to resume: finished shards are kept beside --out until the pass completes."""
    from .prior_pass import estimate_priors

    res = estimate_priors(checkpoint, data, out, split=split, weights=weights, device=device, actors=actors,
                          batch_size=batch_size, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                          workers=workers, progress=not no_progress, fresh=fresh, shard_retries=shard_retries)
    sp = f"Spearman vs annotation counts {res['spearman_vs_counts']}"
    if "spearman_vs_truth" in res:
        sp += f", vs truth {res['spearman_vs_truth']} (counts vs truth {res['spearman_counts_vs_truth']})"
    click.echo(f"{res['samples']} samples scored of {res['manifest_samples']} in the manifest ({res['corrupt']} corrupt; "
               f"{res['reused_shards']} of {res['shards']} shards reused from an earlier run) "
               f"by {res['actors']} {(res['plan'] or {}).get('device', '')} actors in {res['seconds']}s, {res['weights']} weights of {res['checkpoint']}; {sp}")
    click.echo(f"wrote {res['outputs']['csv']}, {res['outputs']['json']}, {res['outputs']['png']}")


@app.command("pipeline")
@click.option("--config", "config", default="synthetic-cpu", show_default=True, help="a preset name or a YAML file")
@click.option("--prior-actors", type=click.IntRange(min=1), default=None,
              help="actors for the prior pass [default: cluster.workers on GPUs, else one per CPU]")
@_verbose
@_overrides
def pipeline(config: str, prior_actors, verbose: bool, overrides: tuple[str, ...]) -> None:
    """The method end to end: Ignore model, prior pass, Selective model. Re-run to resume."""
    from .config import load_config
    from .pipeline import run_pipeline

    summary = run_pipeline(load_config(config, list(overrides)), prior_actors=prior_actors, verbose=verbose)
    click.echo(json.dumps(summary))


@app.command("demo")
@click.option("--out", default="demo_out", show_default=True, help="folder for data, runs, results.json, report.md, figures")
@click.option("--train", default=4000, show_default=True, type=click.IntRange(min=64))
@click.option("--val", default=1000, show_default=True, type=click.IntRange(min=16))
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(min=16))
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@_verbose
@_overrides
def demo(out, train, val, image_size, epochs, seed, verbose, overrides) -> None:
    """Synthetic data, prior pass, and Ignore / Negative / Selective models, on this machine."""
    from .demo import run_demo

    res = run_demo(out, train=train, val=val, image_size=image_size, epochs=epochs, seed=seed, overrides=list(overrides),
                   verbose=verbose)
    click.echo(json.dumps(res, indent=1))
    click.echo(f"report: {os.path.join(os.path.abspath(out), 'report.md')}")


def _csv(kind: type = str):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            items = [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}") from None
        if not items:
            raise click.BadParameter(f"empty list {value!r}")
        return items
    return parse


@app.command("experiment")
@click.option("--out", default="experiment_out", show_default=True, help="folder for data, runs, priors, experiment.json/.md")
@click.option("--schemes", default=None, callback=_csv(), help="comma-separated [default: openimages,fpc:<train/20>,rpa:0.5]; bare 'fpc' means fpc:<train/20>")
@click.option("--losses", default="ignore,negative,pasl,csl-L,csl-P,csl-LP,pseudo", show_default=True, callback=_csv())
@click.option("--seeds", default="0,1,2", show_default=True, callback=_csv(int))
@click.option("--train", default=2000, show_default=True, type=click.IntRange(min=64))
@click.option("--val", default=500, show_default=True, type=click.IntRange(min=16))
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=16))
@click.option("--epochs", default=4, show_default=True, type=click.IntRange(min=1))
@_overrides
def experiment(out, schemes, losses, seeds, train, val, image_size, epochs, overrides) -> None:
    """Grid on synthetic data: annotation schemes x losses x seeds, mean ± std of mAP. Re-run to resume."""
    from .experiment import run_experiment

    res = run_experiment(out, schemes=schemes, losses=losses, seeds=seeds, train=train, val=val,
                         image_size=image_size, epochs=epochs, overrides=list(overrides))
    click.echo(f"{res['finished']} of {res['planned']} runs finished")
    click.echo(f"table: {os.path.join(os.path.abspath(out), 'experiment.md')}")


def _one_line(e: BaseException) -> str:
    """The message on one line, with URL credentials removed (user info, signed query strings)
    and control characters escaped: error texts quote URLs and names from input files."""
    from data_shards.format import printable
    from data_shards.storage import redact

    text = str(e).strip() or type(e).__name__
    return printable(redact(" ".join(text.split())))


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("CSL_DEBUG") == "1"
    try:
        rc = app.main(args=argv, prog_name="csl", standalone_mode=False)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except click.ClickException as e:
        # Usage errors: click's own message, one line, exit 2.
        ctx = getattr(e, "ctx", None)
        prefix = ctx.command_path if ctx is not None else "csl"
        print(f"{prefix}: error: {_one_line(e.format_message())}", file=sys.stderr)
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except (ValueError, FileNotFoundError) as e:
        if debug:
            raise
        print(f"csl: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a failure while running: say what, exit 1
        if debug:
            raise
        print(f"csl: failed: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
