"""Command line of ``train.py``: a YAML recipe plus dotted ``key=value`` overrides.

Every failure a user can act on ends with one line, ``error: ...``, naming its cause, and an
exit code that says which kind it was (a traceback is left for what is a bug). Through
``accelerate launch`` the launcher itself exits with 1 whatever its processes returned; the line
is in the log of the process that met the cause.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from pipeline.config import ConfigError, load_config, recipe_path
from shards.manifest import PrepError

EXIT_CONFIG = 2  # the configuration, the prepared data, or a run directory held by another job
EXIT_BAD_DATA = 3  # a sample that cannot be read (data.on_bad_sample=stop), too many skipped, or the store down
EXIT_NO_SPACE = 4  # the disk is full (a checkpoint, a log)
EXIT_PEER = 5  # another process of the job died or stopped responding
EXIT_STOPPED = 143  # stopped on a signal after writing a checkpoint, not requeued (128 + SIGTERM)


def fail(error: BaseException | str, code: int) -> None:
    """One line, from one process: an error every process raised alike is printed by the main one."""
    from tqdm import tqdm

    if not getattr(error, "on_every_rank", False) or os.environ.get("RANK", "0") == "0":
        tqdm.write(f"error: {error}", file=sys.stderr)  # on a line of its own, under a progress bar
    sys.exit(code)


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
    except ConfigError as exc:
        fail(exc, EXIT_CONFIG)
    from pipeline.data.prepared import BadSampleError
    from pipeline.ops.launch import LaunchError, collective_failure
    from pipeline.ops.run_lock import RunDirInUse
    from shards.store import StoreError, error_line

    from .checkpoint import NoSpaceForCheckpoint
    from .trainer import train

    try:
        result = train(config)
    except (ConfigError, PrepError, LaunchError, RunDirInUse) as exc:
        fail(exc, EXIT_CONFIG)
    except BadSampleError as exc:
        fail(exc, EXIT_BAD_DATA)
    except StoreError as exc:  # the object store failed for data.remote_retry_s (or lost a listed shard)
        fail(error_line(exc), EXIT_BAD_DATA)
    except NoSpaceForCheckpoint as exc:
        fail(exc, EXIT_NO_SPACE)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        fail(f"no space left on device writing {exc.filename or 'the run directory'} ({exc.strerror})", EXIT_NO_SPACE)
    except RuntimeError as exc:
        message = collective_failure(exc, config.collective_timeout_s)
        if message is None:
            raise
        fail(message, EXIT_PEER)
    if result.get("preempted_at_step") is not None and not result["requeued"]:
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":  # accelerate launch -m pipeline.train.cli (googlenet train)
    main()
