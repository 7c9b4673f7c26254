"""``googlenet``: every tool of the project as one command. Each subcommand is the tool's own
command line, run in this process as ``python -m MODULE`` would run it: the same arguments, the
same ``--help`` and the same exit code (the ``python -m`` forms keep working).

    googlenet data demo --out demo_data                # python -m data_prep demo --out demo_data
    googlenet evaluate --run runs/demo --crops 10      # python -m pipeline.inference.evaluate ...
    googlenet train --num_processes 2 --config configs/cifar10.yaml train.max_steps=100

``googlenet train`` is ``accelerate launch train.py``: accelerate's launch options (told apart by
accelerate's own parser, or all of them before a ``--``) go to the launcher, ``--config`` and the
``key=value`` overrides to the trainer. Nothing heavy is imported before a tool starts, so
``googlenet --help`` loads neither torch nor any tool.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import NamedTuple


class Tool(NamedTuple):
    module: str
    summary: str


TOOLS = {
    "data": Tool("data_prep", "prepare and verify data: demo, synthetic, shards, ffcv, finalize, verify"),
    "train": Tool("pipeline.train.cli",
                  "train: accelerate launch train.py [launch options] [--config RECIPE] [key=value ...]"),
    "evaluate": Tool("pipeline.inference.evaluate", "top-1/top-5 error with the paper's 1, 10 or 144 crops, ensembles"),
    "predict": Tool("pipeline.inference.predict", "classify image files with a trained model"),
    "export": Tool("pipeline.inference.export", "a checkpoint as a state dict, TorchScript or ONNX file"),
    "report": Tool("pipeline.train.report", "time to accuracy: a table and a plot of runs' validation error"),
    "trackers": Tool("pipeline.train.trackers", "trackers sync RUN_DIR: send MLflow, W&B or Aim what they missed"),
    "slurm": Tool("pipeline.ops.slurm", "submit training or data preparation to SLURM"),
    "k8s": Tool("pipeline.ops.k8s", "render or submit training to Kubernetes as a Kubeflow Trainer TrainJob"),
    "gpu-report": Tool("benchmarks.gpu_report", "every GPU figure in one run, in a checkout of the repository"),
}
# The trainer's own options and whether each takes a value. They are never the launcher's, although
# accelerate's parser would take --config as an abbreviation of its --config_file, and -h as its help.
TRAINER_OPTIONS = {"--config": True, "-h": False, "--help": False}


def overview() -> str:
    lines = ["usage: googlenet COMMAND [ARGUMENTS ...]", "",
             "Every tool of the GoogLeNet pipeline; each command runs the one in parentheses with the same arguments,",
             "and 'googlenet COMMAND --help' is that tool's own help.",
             "", "commands:"]
    width = max(map(len, TOOLS))
    lines += [f"  {name:<{width}}  {tool.summary}" + ("" if name == "train" else f" (python -m {tool.module})")
              for name, tool in TOOLS.items()]
    return "\n".join(lines)


def run_as_main(module: str, args: list[str]) -> int:
    """``python -m MODULE ARGS`` in this process: the tool reads sys.argv and exits as it would run so."""
    sys.argv = [module, *args]  # run_module puts the module's file in argv[0]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0  # a tool that returns without sys.exit succeeded


def launch_options() -> dict[str, bool]:
    """Each option of ``accelerate launch`` and whether it takes a value, from accelerate's own parser
    (argparse has no public list of a parser's actions)."""
    from accelerate.commands.launch import launch_command_parser

    return {option: action.nargs != 0 for action in launch_command_parser()._actions
            for option in action.option_strings}


def split_train_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``googlenet train``'s arguments as (accelerate launch's, the trainer's). Before a ``--``, all
    are the launcher's; without one, the options accelerate launch knows (and their values) are,
    wherever they stand. Raises ValueError on an option neither knows."""
    if "--" in args:
        split = args.index("--")
        return args[:split], args[split + 1:]
    launcher, trainer = [], []
    known = None  # accelerate's parser costs an import of torch: read only for an option not the trainer's
    words = iter(args)
    for word in words:
        option, has_value = word.split("=", 1)[0], "=" in word
        if not word.startswith("-"):
            trainer.append(word)
            continue
        if option in TRAINER_OPTIONS:
            target, takes_value = trainer, TRAINER_OPTIONS[option]
        else:
            known = known if known is not None else launch_options()
            if option not in known:
                raise ValueError(f"{option} is neither an option of accelerate launch nor of train.py")
            target, takes_value = launcher, known[option]
        target.append(word)
        value = next(words, None) if takes_value and not has_value else None
        if value is not None:
            target.append(value)
    return launcher, trainer


def train(args: list[str]) -> int:
    try:
        launcher, trainer = split_train_args(args)
    except ValueError as exc:
        print(f"googlenet train: {exc}", file=sys.stderr)
        return 2
    if "-h" in trainer or "--help" in trainer:  # the trainer's help needs no launcher
        return run_as_main(TOOLS["train"].module, trainer)
    # train.py is pipeline.train.cli's main: run as a module, it needs no checkout beside the package
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", TOOLS["train"].module, *trainer]
    os.execv(sys.executable, command)  # the launcher takes this process over: its signals and exit code


def checkout_with(relative: str) -> Path | None:
    """The checkout holding RELATIVE: the one this package runs from, else the current directory
    (where ``python -m`` would find it)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / relative).is_file():
            return root
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in TOOLS:
        print(f"googlenet: unknown command {name!r}; the commands are {', '.join(TOOLS)} (googlenet --help)",
              file=sys.stderr)
        return 2
    if name == "train":
        return train(rest)
    module = TOOLS[name].module
    if module.startswith("benchmarks."):  # not an installed package: the benchmarks live in the checkout
        script = module.replace(".", "/") + ".py"
        root = checkout_with(script)
        if root is None:
            print(f"googlenet {name}: {script} is not installed with the package; run it in a checkout of the "
                  f"repository", file=sys.stderr)
            return 2
        sys.path.insert(0, str(root))
    return run_as_main(module, rest)


if __name__ == "__main__":
    sys.exit(main())
