"""Where the scalars go: each tracker ``train.log_with`` names (TensorBoard, MLflow, Weights &
Biases, Aim), through Accelerate's tracker classes, from the main process only.

TensorBoard is Accelerate's own tracker as before (opened in ``tracking``; it writes local files,
and its failures end the run as any other write in the run directory does). The others run on a
thread of their own, so that a slow or lost server never holds up the training loop (the other
processes would wait for the main one in the next collective, and end the job after
``train.collective_timeout_s``): the loop only queues the values. A tracker that cannot start,
or fails later, is one ``warning:`` line on stderr and is off for the rest of the run.

``trackers.json`` in the run directory keeps each tracker's run (MLflow run id, W&B run id, Aim
run hash), so that a resume continues it, and the highest step of each scalar sent to them. No
credentials are written there, nor anywhere in the run directory: they come from the environment
or the trackers' own login files, and warnings hide passwords in URLs and the values of secret
environment variables.
"""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from pipeline.config import Config, ConfigError, to_dict
from shards.manifest import atomic_write_json

STATE_FILE = "trackers.json"
DEFAULT_PROJECT = "googlenet"  # train.tracker_project when null
# The modules each tracker needs. MLflow's store in the run directory is SQLite (MLflow 3 refuses
# a plain-file store), which needs SQLAlchemy and Alembic; mlflow-skinny leaves them out.
MODULES = {"mlflow": ("mlflow",), "wandb": ("wandb",), "aim": ("aim",)}
LOCAL_MLFLOW_MODULES = ("sqlalchemy", "alembic")
FINISH_WAIT_S = 300.0  # at the end of the run, the longest wait for the trackers to send what is queued
_SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def require_installed(log_with: list[str]) -> None:
    """Every tracker chosen can be imported, else a ConfigError naming the extra that installs it;
    on every process, before anything starts."""
    for name in log_with:
        needed = MODULES.get(name, ())
        if name == "mlflow" and mlflow_store_uri_is_local():
            needed += LOCAL_MLFLOW_MODULES
        missing = [module for module in needed if not _importable(module)]
        if missing:
            raise ConfigError(f"train.log_with: {name} needs the Python package {missing[0]}, which is not "
                              f"installed: pip install '.[{name}]' (or bash scripts/setup.sh --trackers)")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module without a spec (set up by hand) is there
        return module in sys.modules and sys.modules[module] is not None


def mlflow_store_uri_is_local() -> bool:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return not uri or uri.startswith("sqlite:")


def redact(text: str) -> str:
    """``text`` without passwords in URLs (``scheme://user:password@``) or the values of environment
    variables whose names say they are secret (API keys, tokens, passwords)."""
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name) and len(value) >= 6:
            text = text.replace(value, "***")
    return text


def params(config: Config) -> dict[str, object]:
    """The configuration as the trackers' parameters: dotted keys (``optim.lr``), URLs without credentials."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = redact(value) if isinstance(value, str) else value

    walk("", to_dict(config))
    return flat


def say(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # on a line of its own, under a progress bar


def cause(exc: BaseException) -> str:
    """The exception in a line: its type and the first line of its message, whose start and end
    are kept when long (a client's message often ends with the underlying cause)."""
    text = str(exc).strip()
    first = redact(text.splitlines()[0]) if text else ""
    if len(first) > 400:
        first = f"{first[:150]} ... {first[-250:]}"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ------------------------------------------------------------------------------------------ the trackers
# Each starts its tracker from what trackers.json saved for it ({} on a new run) and returns it,
# what to save for a resume, and a line saying where it logs. Parameters go to a new run only.
def start_mlflow(config: Config, saved: dict, values: dict):
    import mlflow
    from accelerate.tracking import MLflowTracker
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    artifacts = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        store = config.run_dir.resolve() / "mlflow"
        store.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
        artifacts = str(store / "artifacts")  # else the experiment's artifacts would go to ./mlruns
    tracker = MLflowTracker(experiment_name=config.train.tracker_project or DEFAULT_PROJECT, logging_dir=artifacts,
                            run_id=saved.get("run_id"), run_name=config.name)
    tracker.start()
    info = tracker.active_run.info
    if not saved.get("run_id"):
        tracker.store_init_configuration({k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in values.items()})
    experiment = mlflow.get_experiment(info.experiment_id).name
    return tracker, {"run_id": info.run_id}, f"run {info.run_id} (experiment {experiment}) at {mlflow.get_tracking_uri()}"


def start_wandb(config: Config, saved: dict, values: dict):
    import wandb
    from accelerate.tracking import WandBTracker

    # console off: W&B would otherwise wrap stdout and stderr (the progress bar, the error lines).
    tracker = WandBTracker(config.train.tracker_project or DEFAULT_PROJECT, name=config.name, id=saved.get("id"),
                           resume="allow", dir=str(config.run_dir.resolve()),
                           settings=wandb.Settings(console="off", quiet=True))
    tracker.start()
    if not saved.get("id"):
        tracker.store_init_configuration(values)
    run = tracker.run
    where = f"{Path(run.dir).parent} (offline)" if run.offline else run.url
    return tracker, {"id": run.id}, f"run {run.id} (project {run.project}) at {where}"


def start_aim(config: Config, saved: dict, values: dict):
    from accelerate.tracking import AimTracker

    repo = os.environ.get("AIM_REPO") or str(config.run_dir.resolve() / "aim")

    def start(force_resume: bool):
        # No system metrics thread, no copy of the terminal, and no system parameters (they
        # include the environment variables, secrets among them).
        tracker = AimTracker(config.name, repo, run_hash=saved.get("run_hash"), experiment=config.train.tracker_project
                             or DEFAULT_PROJECT, system_tracking_interval=None, capture_terminal_logs=False,
                             log_system_params=False, force_resume=force_resume)
        tracker.start()
        return tracker

    try:
        tracker = start(force_resume=False)
    except Exception:
        if not saved.get("run_hash"):
            raise
        # Aim clears the lock of a job that died on this machine, not on another: the run
        # directory's lock (pipeline.ops.run_lock) says that no other job uses this run.
        tracker = start(force_resume=True)
    if not saved.get("run_hash"):
        tracker.store_init_configuration(values)
    return tracker, {"run_hash": tracker.writer.hash}, f"run {tracker.writer.hash} in {redact(repo)}"


STARTERS: dict[str, Callable] = {"mlflow": start_mlflow, "wandb": start_wandb, "aim": start_aim}


# ------------------------------------------------------------------------------------------ fan-out
def open_trackers(accelerator, config: Config, tensorboard) -> Trackers | None:
    """The trackers of ``config.train.log_with`` on the main process (None on the others), after
    ``tracking.start_tracking``; ``tensorboard``: Accelerate's TensorBoard tracker, or None."""
    if not accelerator.is_main_process:
        return None
    return Trackers(config, tensorboard, [name for name in config.train.log_with if name in STARTERS])


class Trackers:
    """``log(values, step)`` sends every scalar to TensorBoard at once and queues it for the other
    trackers; ``finish()`` at the end of the run (or a stop) sends what is queued and closes them."""

    def __init__(self, config: Config, tensorboard, names: list[str]):
        self.tensorboard, self.names = tensorboard, names
        self.path = config.run_dir / STATE_FILE
        self.state = read_state(self.path) if names else {}
        # No step twice. TensorBoard hides what an interrupted run logged after its checkpoint
        # (purge_step); the others cannot take values back, so the highest step of each scalar sent
        # to them is recorded before it is sent, and a resume sends only the steps above it: training
        # resumes exactly, so the values of the steps it redoes are those already sent (throughput
        # aside). Per scalar, because validation logs at the step of the epoch's last training
        # values: a job killed while it validates has sent those, not the validation's.
        self.skip_through: dict[str, int] = dict(self.state.get("sent_through") or {})
        # trackers.json of an earlier version: one step for every scalar
        self.skip_all_through = int(self.state.get("logged_through", -1))
        self.active: dict[str, object] = {}
        self.queue: queue.Queue = queue.Queue()
        self.thread = None
        self.save_failed = False
        if names:
            self.thread = threading.Thread(target=self._work, args=(config,), name="trackers", daemon=True)
            self.thread.start()

    def log(self, values: dict, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.log(values, step=step)
        if self.thread is None:
            return
        unsent = {tag: value for tag, value in values.items()
                  if step > max(self.skip_all_through, self.skip_through.get(tag, -1))}
        if unsent:
            self.queue.put((unsent, step))

    def finish(self, wait_s: float = FINISH_WAIT_S) -> None:
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join(wait_s)
        if self.thread.is_alive():
            say(f"warning: {', '.join(self.active) or 'the trackers'}: still sending after {wait_s:g} s at the end of "
                f"the run; {self.queue.qsize()} log calls left unsent")
        self.thread = None

    # On the trackers' thread.
    def _work(self, config: Config) -> None:
        values = params(config)
        for name in self.names:
            try:
                tracker, saved, where = STARTERS[name](config, dict(self.state.get(name) or {}), values)
            except Exception as exc:  # unreachable, refused, misconfigured: this tracker is off, training goes on
                say(f"warning: {name}: cannot start ({cause(exc)}); off for the rest of the run")
                continue
            self.active[name] = tracker
            self.state[name] = saved
            say(f"{name}: logging to {redact(where)}")
        if self.active:
            self._save()
        while (item := self.queue.get()) is not None:
            values, step = item
            if not self.active:
                continue
            sent_through = self.state.setdefault("sent_through", {})
            newer = {tag: step for tag in values if step > sent_through.get(tag, -1)}
            if newer:
                sent_through.update(newer)
                self._save()
            for name, tracker in list(self.active.items()):
                try:
                    tracker.log(values, step=step)
                except Exception as exc:
                    del self.active[name]
                    say(f"warning: {name}: logging at step {step} failed ({cause(exc)}); off for the rest of the run")
        for name, tracker in list(self.active.items()):
            try:
                tracker.finish()
            except Exception as exc:
                say(f"warning: {name}: closing the run failed ({cause(exc)})")
        self.active.clear()

    def _save(self) -> None:
        try:
            atomic_write_json(self.path, self.state)
        except OSError as exc:
            if not self.save_failed:
                self.save_failed = True
                say(f"warning: {self.path}: cannot write ({cause(exc)}); a resume may start new tracker runs "
                    f"or send steps twice")


def read_state(path: Path) -> dict:
    """trackers.json: {"mlflow": {"run_id"}, "wandb": {"id"}, "aim": {"run_hash"}, "sent_through": {scalar: step}}."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        say(f"warning: {path}: unreadable ({cause(exc)}); the trackers start new runs")
        return {}
    return state if isinstance(state, dict) else {}
