"""Submit training and data preparation to SLURM.

    python -m pipeline.ops.slurm submit --config configs/NAME.yaml --nodes N --gpus-per-node G \\
        [--procs-per-node P] [--cpus-per-task C] [--partition P] [--time T] [--account A] [--dry-run] [key=value ...]
    python -m pipeline.ops.slurm submit-prep --tasks N [--cpus-per-task C] [...] [--dry-run] -- <data_prep shards arguments>

The batch scripts in ``slurm/`` are rendered with the options filled in (``--dry-run`` prints
them) and given to ``sbatch``. Training logs go to ``runs/NAME/slurm-JOBID.out``.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config, recipe_path
from shards.manifest import PrepError
from shards.store import is_remote

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "# >>> sbatch options", "# <<< sbatch options"


def render(template: Path, options: list[str], arguments: list[str], env: dict[str, str]) -> str:
    """The template with its option block replaced, the environment and arguments baked in.

    ``sbatch`` also gets every option on its command line (no shell, so paths with spaces or
    quotes survive); the block shows them, less any that #SBATCH parsing would split."""
    text = template.read_text()
    head, rest = text.split(BEGIN + "\n", 1)
    _, body = rest.split(END + "\n", 1)
    block = "".join(f"#SBATCH {o}\n" if not any(c.isspace() or c in "'\"" for c in o) else f"# (sbatch argument) {o}\n"
                    for o in options)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    args = "set -- " + " ".join(shlex.quote(a) for a in arguments) + "\n"
    # The #SBATCH lines must come before the first command; the rest after `set -euo pipefail`.
    first, _, tail = body.partition("\n")
    return f"{head}{BEGIN}\n{block}{END}\n{first}\n{exports}{args}{tail}"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partition")
    parser.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    parser.add_argument("--account")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per node (training) or per array task (preparation)")
    parser.add_argument("--job-name")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script instead of submitting it")


def _scheduling(args) -> list[str]:
    options = []
    for flag, value in (("--partition", args.partition), ("--time", args.time), ("--account", args.account),
                        ("--cpus-per-task", args.cpus_per_task)):
        if value is not None:
            options.append(f"{flag}={value}")
    return options


def sbatch(script: str, cwd: Path, options: list[str]) -> str:
    result = subprocess.run(["sbatch", "--parsable", *options], input=script, text=True, capture_output=True, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def submit_training(args) -> int:
    config = load_config(recipe_path(args.config), args.overrides)  # fail here, not in the queue
    run_dir = config.run_dir.absolute()
    procs = args.procs_per_node if args.procs_per_node is not None else max(1, args.gpus_per_node)
    options = [f"--job-name={args.job_name or 'googlenet-' + config.name}", f"--nodes={args.nodes}",
               "--ntasks-per-node=1", "--requeue", "--open-mode=append", f"--signal=USR2@{args.signal_seconds}",
               f"--output={run_dir}/slurm-%j.out"]
    if args.gpus_per_node:
        options.append(f"--gpus-per-node={args.gpus_per_node}")
    options += _scheduling(args)
    env = {"GOOGLENET_REPO": str(REPO), "GOOGLENET_PYTHON": sys.executable,
           "GOOGLENET_GPUS_PER_NODE": str(args.gpus_per_node), "GOOGLENET_PROCS_PER_NODE": str(procs)}
    arguments = ["--config", str(recipe_path(args.config).absolute()), *args.overrides]
    script = render(REPO / "slurm" / "train.sbatch", options, arguments, env)
    if args.dry_run:
        print(script)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    job = sbatch(script, Path.cwd(), options)
    print(f"submitted job {job}: {args.nodes} nodes x {procs} processes")
    print(f"log: {run_dir}/slurm-{job}.out")
    print(f"tensorboard --logdir {run_dir}/tensorboard")
    return 0


def submit_preparation(args) -> int:
    prep_args = args.prep_args[1:] if args.prep_args[:1] == ["--"] else args.prep_args
    if "--out" not in prep_args:
        raise ConfigError("submit-prep: the data_prep shards arguments need --out DIR")
    out = prep_args[prep_args.index("--out") + 1]
    if is_remote(out):  # shards go to an object store: the logs stay here
        logs = Path.cwd() / f"prep-{out.rstrip('/').rsplit('/', 1)[-1]}-logs"
    else:
        out = Path(out).absolute()
        logs = out.parent / f"{out.name}-logs"
    options = [f"--job-name={args.job_name or 'googlenet-prep'}", f"--array=0-{args.tasks - 1}", "--ntasks=1",
               f"--output={logs}/prep-%A_%a.out", *_scheduling(args)]
    env = {"GOOGLENET_REPO": str(REPO), "GOOGLENET_PYTHON": sys.executable}
    script = render(REPO / "slurm" / "prep.sbatch", options, prep_args, env)
    finalize = ("#!/bin/bash\n#SBATCH --job-name=googlenet-prep-finalize\n"
                + "".join(f"#SBATCH {o}\n" for o in _scheduling(args) if not o.startswith("--cpus"))
                + f"exec {shlex.quote(sys.executable)} -m data_prep finalize {shlex.quote(str(out))}\n")
    if args.dry_run:
        print(script)
        print("# then, after every array task succeeded (--dependency=afterok:ARRAY_JOB):")
        print(finalize)
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    array = sbatch(script, Path.cwd(), options)
    final = sbatch(finalize, Path.cwd(), [f"--dependency=afterok:{array}", f"--output={logs}/finalize-%j.out"])
    print(f"submitted array job {array} ({args.tasks} tasks) and finalize job {final}")
    print(f"logs: {logs}/")
    print(f"manifest, when done: {out}/manifest.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ops.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="submit a training job")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU-only nodes (gloo)")
    p.add_argument("--procs-per-node", type=int, help="default: one per GPU (1 on CPU-only nodes)")
    p.add_argument("--signal-seconds", type=int, default=120, help="warning (USR2) before the time limit")
    _common(p)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.set_defaults(func=submit_training)
    p = sub.add_parser("submit-prep", help="submit the data preparation as an array job plus finalize")
    p.add_argument("--tasks", type=int, required=True)
    _common(p)
    p.add_argument("prep_args", nargs=argparse.REMAINDER, help="-- then the arguments of data_prep shards")
    p.set_defaults(func=submit_preparation)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PrepError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
