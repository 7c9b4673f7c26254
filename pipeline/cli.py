"""Command line of ``train.py``: a YAML recipe plus dotted ``key=value`` overrides."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.manifest import PrepError

from .config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def recipe_path(path: str) -> Path:
    """A recipe path as given, or else relative to the repository (``configs/NAME.yaml``)."""
    given = Path(path)
    if given.is_file() or given.is_absolute() or not (REPO / given).is_file():
        return given
    return REPO / given


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="accelerate launch train.py",
        description="Train GoogLeNet. With no arguments: the demo (configs/default.yaml).",
    )
    parser.add_argument("--config", default="configs/default.yaml", help="YAML recipe (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.02 data.batch_size=64")
    args = parser.parse_args(argv)
    try:
        config = load_config(recipe_path(args.config), args.overrides)
        from .launch import LaunchError
        from .trainer import train

        try:
            train(config)
        except LaunchError as exc:
            raise ConfigError(str(exc)) from exc
    except (ConfigError, PrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
