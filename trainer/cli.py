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

import os
import sys

import click

from data_shards.cli import shards_app

__all__ = ["app", "main"]

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Train multi-label classifiers on partially annotated data (Class-aware Selective Loss)."""


app.add_command(shards_app)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


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
