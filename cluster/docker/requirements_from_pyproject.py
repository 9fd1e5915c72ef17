"""Print the project's runtime requirements (plus chosen extras) from pyproject.toml.

Why this exists: the image installs dependencies in a layer that depends on `pyproject.toml`
alone, then copies the code and installs the package with `--no-deps`. A code change then
rebuilds only the last, small layer. `pip install .` cannot do the first half (it needs the
code), and a hand-kept requirements file would drift from pyproject.toml; this reads the one
source of truth with the standard library (`tomllib`), so it runs in a bare base image.

    python requirements_from_pyproject.py pyproject.toml [EXTRA ...] > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib

__all__ = ["requirements"]


def requirements(pyproject_path: str, extras: list[str]) -> list[str]:
    with open(pyproject_path, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{pyproject_path}: unknown extra(s) {unknown}; known: {sorted(optional)}")
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += optional[extra]
    return reqs


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: requirements_from_pyproject.py PYPROJECT [EXTRA ...]")
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
