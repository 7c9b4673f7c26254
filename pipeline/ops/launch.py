"""The Accelerator every entry point (training, evaluation) runs under, checked against the launcher,
and what a failed collective means for the user."""
from __future__ import annotations

import os
import re
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, TorchDynamoPlugin

from pipeline.config import Config, ConfigError
from shards.cpus import usable_cpus


class LaunchError(RuntimeError):
    """The processes did not form the group the launcher asked for."""


def on_every_rank(exc: BaseException) -> BaseException:
    """Mark an error that every process raises alike (after agreeing on it in a collective), so
    that only the main process prints it."""
    exc.on_every_rank = True
    return exc


def dynamo_plugin(config: Config, compile_model: bool) -> TorchDynamoPlugin:
    """How ``prepare`` compiles: the recipe's backend and mode, torch.compile's defaults for the
    rest. Every field is set here: TorchDynamoPlugin fills a field left None from
    ACCELERATE_DYNAMO_*, which ``accelerate launch`` sets from the user's default Accelerate
    config, and would then turn on fullgraph, dynamic shapes or regional compilation, or
    change the mode, behind the recipe's back."""
    plugin = TorchDynamoPlugin(backend=config.model.compile_backend if compile_model else "no",
                               mode=config.model.compile_mode, fullgraph=False, use_regional_compilation=False,
                               options=None, disable=False)
    plugin.dynamic = None  # torch.compile's default; given as None, it would be read from the environment
    return plugin


def compilation(config: Config) -> str:
    """The start-up line's word on compilation, which only the recipe decides."""
    if config.model.compile:
        return (f"compiled ({config.model.compile_backend}, {config.model.compile_mode}) as the recipe says "
                f"(model.compile), not ACCELERATE_DYNAMO_*")
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    if backend.lower() != "no":
        return f"not compiled: the recipe's model.compile is false (ACCELERATE_DYNAMO_BACKEND={backend} not used)"
    return ""


def make_accelerator(config: Config, *, compile_model: bool = False) -> Accelerator:
    """``compile_model``: let ``prepare`` torch.compile the model after wrapping it in DDP, as
    torch documents for DDP (the compiled graph is split at DDP's gradient buckets, so their
    all-reduce overlaps the backward); only the recipe decides (``dynamo_plugin``), not
    Accelerate's environment or config file."""
    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    # A NCCL collective that times out aborts the communicator and ends the process (instead of
    # hanging on): with the timeout below, a dead node ends the job within that time.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # Without cpu=True on a host without CUDA, Accelerate starts independent single-process runs
    # instead of one gloo group; on CUDA hosts, the launcher's settings apply as usual.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        # TensorBoard only: pipeline.train.trackers starts the others itself, so that one that
        # cannot be reached is a warning rather than the end of the run.
        log_with=["tensorboard"] if "tensorboard" in config.train.log_with else None,
        project_config=ProjectConfiguration(project_dir=str(config.run_dir), logging_dir=str(config.run_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout_s))],
        dynamo_plugin=dynamo_plugin(config, compile_model),
    )
    if accelerator.device.type == "cuda":
        # Shapes are static within a run: let cuDNN time its algorithms once per shape and keep
        # the fastest; TF32 for float32 matrix products (convolutions already use it by default).
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if accelerator.device.type == "cpu":
        # accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise; on a CPU-only host
        # give each process its share of the cores instead (1.4x faster for the demo on 2 cores):
        # of those it may use, not of all it sees (shards.cpus: a quota, a SLURM allocation).
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, usable_cpus() // local_processes))
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"the launcher started {expected} processes but they formed a group of "
            f"{accelerator.num_processes}; refusing to train as independent copies"
        )
    return accelerator


def loader_workers(configured: int | None, accelerator: Accelerator) -> int:
    """``data.workers``, where null means the cores per local training process: the fewest any
    process of the job has, the same number on every rank (it is part of the run's layout, which
    a resume checks on every rank; nodes of a job may differ)."""
    if configured is not None:
        return configured
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = torch.tensor([max(1, usable_cpus() // local_processes)], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(workers, op=torch.distributed.ReduceOp.MIN)
    return int(workers.item())


# How gloo (and torch's store) report a peer that stopped answering or died.
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
# DDP's all-reduce in backward raises a plain RuntimeError: "Application timeout caused pair closure".
_FROM_GLOO = re.compile(r"gloo|collective|pair closure", re.IGNORECASE)
_PEER_LOST = re.compile(r"connection (closed|reset) by peer|broken pipe|socket closed", re.IGNORECASE)


def collective_failure(exc: BaseException, timeout_s: float) -> str | None:
    """One line saying what a failed collective means, or None if ``exc`` is something else."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    distributed = isinstance(exc, torch.distributed.DistError) or _FROM_GLOO.search(text)
    if _TIMED_OUT.search(text) and distributed:
        return (f"a collective operation timed out after {timeout_s:g} s (train.collective_timeout_s): another "
                f"process stopped responding (a dead node, a hung loader or GPU); see its log ({first})")
    if _PEER_LOST.search(text):
        return (f"another process of the job died or lost its connection ({first}); see its log. "
                f"Run the same command to resume from the last checkpoint")
    return None
