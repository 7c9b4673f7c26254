"""Where the scalars go: each tracker ``train.log_with`` names (TensorBoard, MLflow, Weights &
Biases, Aim), through Accelerate's tracker classes, from the main process only; and
``python -m pipeline.train.trackers sync RUN_DIR``, which sends them what they missed.

TensorBoard is Accelerate's own tracker as before (opened in ``tracking``; it writes local files,
and its failures end the run as any other write in the run directory does). Each of the others
runs on a thread of its own, so that a slow or lost server never holds up the training loop (the
other processes would wait for the main one in the next collective, and end the job after
``train.collective_timeout_s``) nor the other trackers: the loop only queues the values. A tracker
that cannot start, fails a call, or does not answer one within ``DOWN_AFTER_S`` is one
``warning:`` line on stderr and is set aside for the rest of the run; the end of the run does not
wait for it. The clients' own retries are bounded (``CLIENT_LIMITS``), so that a refused request
fails in seconds rather than minutes.

``trackers.json`` in the run directory keeps each tracker's run (MLflow run id, W&B run id, Aim
run hash), so that a resume continues it, and the highest step of each scalar sent to them. A
tracker set aside also gets ``behind``: the highest step of each scalar it had when it was lost.
What it misses from there is in the run's TensorBoard events, and reaches it exactly once: the
next job of the run (a resume) or ``sync`` sends each value the tracker's own store does not
hold, then ends its run FINISHED (FAILED when the training failed).

No credentials are written there, nor anywhere in the run directory: they come from the
environment or the trackers' own login files, and warnings hide passwords in URLs and the values
of secret environment variables.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import queue
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from pipeline.config import Config, ConfigError, load_config, to_dict
from pipeline.ops.run_lock import RunDirInUse, acquire
from shards.manifest import atomic_write_json

STATE_FILE = "trackers.json"
DEFAULT_PROJECT = "googlenet"  # train.tracker_project when null
# The modules each tracker needs. MLflow's store in the run directory is SQLite (MLflow 3 refuses
# a plain-file store), which needs SQLAlchemy and Alembic; mlflow-skinny leaves them out.
MODULES = {"mlflow": ("mlflow",), "wandb": ("wandb",), "aim": ("aim",)}
LOCAL_MLFLOW_MODULES = ("sqlalchemy", "alembic")
# The clients' retries, bounded so that a server that stops answering fails a request in seconds:
# MLflow's own defaults retry 7 times with doubling backoff and wait 120 s for each answer
# (minutes in all). Defaults only: the job's environment overrides each.
CLIENT_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # 3 tries: a refused connection fails within 4 s
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # waits of up to 1 s, then 2-3 s
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",  # seconds for an answer to each try
    "WANDB_INIT_TIMEOUT": "60",  # wandb.init's wait for its service and, online, the server (90)
    "WANDB_HTTP_TIMEOUT": "10",  # each request of W&B's API, online (20)
}
# A call to a tracker (one log, closing its run) that has not returned in this long: its server
# is taken as lost and the tracker is set aside (Aim's remote client, for one, retries a write
# for ever). Starting gets longer: the first use of a local MLflow store builds its tables.
DOWN_AFTER_S = 10.0
START_WAIT_S = 120.0
WATCH_EVERY_S = 0.5
FINISH_WAIT_S = 300.0  # at the end of the run, the longest wait for trackers that answer to send what is queued
_SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def limit_clients() -> None:
    """``CLIENT_LIMITS`` in the environment, where the job's own environment does not set them."""
    for name, value in CLIENT_LIMITS.items():
        os.environ.setdefault(name, value)


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

    repo = os.environ.get("AIM_REPO") or complete_aim_repo(config.run_dir.resolve() / "aim")

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


def complete_aim_repo(repo: Path) -> str:
    """The run's own Aim repository, its creation completed if a job was killed during it: Aim
    writes ``.aim/VERSION`` last and takes a repository without it for one of Aim 2, which it
    refuses for ever after ("out of date"). Only this project creates this repository, so the
    missing VERSION can only mean a creation cut short; Aim's own creation steps are repeatable.
    A shared repository (``AIM_REPO``) is left to Aim."""
    if (repo / ".aim").is_dir() and not (repo / ".aim" / "VERSION").exists():
        from aim import Repo

        Repo.from_path(str(repo), init=True)
    return str(repo)


# What each tracker's own store holds of its run (sync and a resume send only what it lacks),
# closing its run, and letting go of its client once its server is lost.
def mlflow_held(tracker, run_dir: Path, tags: list[str]) -> dict[str, set[int]]:
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(), tracker.active_run.info.run_id
    return {tag: {metric.step for metric in client.get_metric_history(run_id, tag)} for tag in tags}


def close_mlflow(tracker, failed: bool) -> None:
    import mlflow

    mlflow.end_run(status="FAILED" if failed else "FINISHED")  # on the thread that started it: MLflow's run is per thread


def wandb_held(tracker, run_dir: Path, tags: list[str]) -> dict[str, set[int]]:
    """What W&B's own run files of this run hold (``RUN_DIR/wandb/*/run-ID.wandb``, one per job,
    offline or online): what its service wrote, and what ``wandb sync`` uploads."""
    held: dict[str, set[int]] = {tag: set() for tag in tags}
    for path in sorted((run_dir / "wandb").glob(f"*/run-{tracker.run.id}.wandb")):
        for step, keys in wandb_history(path):
            for key in keys & held.keys():
                held[key].add(step)
    return held


WANDB_BLOCK = 32768


def wandb_history(path: Path):
    """(step, scalar names) of each history record of a W&B run file: LevelDB's log format (32 KiB
    blocks of checksummed chunks) after a 7-byte header, each record one of wandb's protobuf
    ``Record``s (wandb has no reader of its own in Python). Reading stops at a chunk cut short: a
    file still being written, or left by a service that was killed."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    if data[:4] != b":W&B":
        return
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            return
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                yield record.history.step.num, {item.key or "/".join(item.nested_key) for item in record.history.item}


def close_wandb(tracker, failed: bool) -> None:
    tracker.run.finish(exit_code=1 if failed else 0)


def let_go_of_wandb(tracker) -> None:
    """wandb's exit hook waits for its service, and prints a traceback when the service is gone;
    teardown unregisters it first, then fails or waits here, on a thread of its own."""
    import wandb

    wandb.teardown()


def aim_client(tracker):
    """The client of a remote repository (``aim://``); None for a local one."""
    return getattr(tracker.writer.repo, "_client", None)  # Aim keeps it private


def log_aim(tracker, values: dict, step: int) -> None:
    tracker.log(values, step=step)
    client = aim_client(tracker)
    if client is not None:  # a remote run queues its writes: wait until the server has them
        client.get_queue().wait_for_finish()


def aim_held(tracker, run_dir: Path, tags: list[str]) -> dict[str, set[int]]:
    held: dict[str, set[int]] = {tag: set() for tag in tags}
    for metric in tracker.writer.metrics():
        if metric.name in held:
            held[metric.name].update(metric.data.indices_list())
    return held


def close_aim(tracker, failed: bool) -> None:
    tracker.finish()  # Aim's runs have no failed state


def let_go_of_aim(tracker) -> None:
    """Aim's remote client retries a write for ever, and at exit waits for its queue, then calls
    the server once for each thing it opened there: a lost server would hold the process for ever
    (aim 3.29, aim/ext/transport/request_queue.py and aim/ext/cleanup). What is queued is dropped
    (TensorBoard's events have it, for sync), and with it those clean-ups."""
    from aim.ext.cleanup import AutoClean

    client = aim_client(tracker)
    if client is None:
        return
    writes = client.get_queue()
    writes._shutdown = True  # its worker stops retrying
    with writes._queue.mutex:  # and whoever waits for it returns
        writes._queue.queue.clear()
        writes._queue.unfinished_tasks = 0
        writes._queue.all_tasks_done.notify_all()
    for _, finalizer in list(AutoClean._finalizers.values()):
        finalizer.detach()


def log_plainly(tracker, values: dict, step: int) -> None:
    tracker.log(values, step=step)


def nothing_to_let_go(tracker) -> None:
    """MLflow's exit hook ends the main thread's run, and its runs here are the trackers' thread's."""


class Kind(NamedTuple):
    """What the trackers need of each tracker besides Accelerate's class."""
    start: Callable  # (config, saved, parameters) -> (tracker, what to save for a resume, where it logs)
    held: Callable  # (tracker, run_dir, tags) -> {tag: the steps its store holds}
    close: Callable  # (tracker, failed)
    let_go: Callable  # (tracker): once set aside, nothing of its client may hold up the process's exit
    log: Callable = log_plainly  # (tracker, values, step): returns once the values are sent
    # Whether what a log call returned from is kept. W&B's service writes its run file after the
    # call, and a service killed loses what it had not written: its catch-up reads the whole file.
    keeps_what_it_took: bool = True


KINDS: dict[str, Kind] = {
    "mlflow": Kind(start_mlflow, mlflow_held, close_mlflow, nothing_to_let_go),
    "wandb": Kind(start_wandb, wandb_held, close_wandb, let_go_of_wandb, keeps_what_it_took=False),
    "aim": Kind(start_aim, aim_held, close_aim, let_go_of_aim, log_aim),
}


def read_board(run_dir: Path) -> dict[str, list[tuple[int, float]]] | None:
    """Every scalar of the run's TensorBoard events, {tag: [(step, value)]}, read with tensorboard's
    own reader, as TensorBoard shows them (what a resume replaced is left out); None if none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from .tracking import TRACKER_DIR

    folder = run_dir / TRACKER_DIR
    if not folder.is_dir():
        return None
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
    events.Reload()
    tags = events.Tags()["scalars"]
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in tags} if tags else None


# ------------------------------------------------------------------------------------------ fan-out
def open_trackers(accelerator, config: Config, tensorboard) -> Trackers | None:
    """The trackers of ``config.train.log_with`` on the main process (None on the others), after
    ``tracking.start_tracking``; ``tensorboard``: Accelerate's TensorBoard tracker, or None."""
    if not accelerator.is_main_process:
        return None
    # The step this job resumed from (start_tracking opens TensorBoard with purge_step one above
    # it): what a tracker missed up to there is in TensorBoard's events; the job logs what follows.
    resumed = tensorboard.init_kwargs.get("purge_step", 1) - 1 if tensorboard is not None else None
    return Trackers(config, tensorboard, [name for name in config.train.log_with if name in KINDS],
                    catch_up_through=resumed)


class Trackers:
    """``log(values, step)`` sends every scalar to TensorBoard at once and queues it for each other
    tracker; ``finish()`` at the end of the run (or a stop) lets those that answer send what is
    queued, and closes their runs.

    ``catch_up_through``: a tracker that missed values in earlier jobs gets those up to this step
    from TensorBoard's events (None: it cannot, without them). ``report`` takes the line saying
    what it got; ``when_down`` ends the warning of a tracker set aside."""

    def __init__(self, config: Config, tensorboard, names: list[str], catch_up_through: float | None = None,
                 report: Callable[[str], None] = say, when_down: str | None = None):
        self.config, self.tensorboard, self.run_dir = config, tensorboard, config.run_dir
        self.path = self.run_dir / STATE_FILE
        self.state = read_state(self.path) if names else {}
        self.catch_up_through, self.report = catch_up_through, report
        self.when_down = when_down or (f"a resume, or python -m pipeline.train.trackers sync {self.run_dir}, "
                                       f"sends it what it missed")
        self.lock = threading.RLock()  # the state, shared by the trackers' threads
        self.board_lock = threading.Lock()
        self.board_read, self.board = False, None
        self.save_failed = self.failed = self.finished = False
        if names:
            limit_clients()
        self.values = params(config) if names else {}
        self.links = [Link(self, name) for name in names]
        for link in self.links:
            link.thread.start()
        self.stopped = threading.Event()
        if self.links:  # a call unanswered is noticed while training goes on, however seldom it logs
            threading.Thread(target=self.watch, name="trackers' watchdog", daemon=True).start()

    def log(self, values: dict, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.log(values, step=step)
        for link in self.links:
            if not link.down:
                link.queue.put((dict(values), step))

    def watch(self) -> None:
        while not self.stopped.wait(WATCH_EVERY_S):
            for link in self.links:
                link.check()

    def finish(self, failed: bool = False, wait_s: float = FINISH_WAIT_S) -> None:
        """Each tracker's run ends FINISHED, or FAILED when the training failed. Trackers that answer
        get up to ``wait_s`` in all to send what is queued; one that does not answer a call in
        ``DOWN_AFTER_S`` is set aside then, and one set aside earlier is not waited for."""
        if self.finished or not self.links:
            return
        self.finished, self.failed = True, failed
        for link in self.links:
            link.queue.put(None)
        deadline = time.monotonic() + wait_s
        for link in self.links:
            while link.thread.is_alive() and not link.down:
                link.check()
                if time.monotonic() > deadline:
                    link.set_down(f"still sending after {wait_s:g} s at the end of the run")
                    break
                link.thread.join(0.1)
        with self.lock:
            lost = [link.name for link in self.links if link.down]
            for name in lost:  # how sync ends its run
                self.state[name]["end_as"] = "FAILED" if failed else "FINISHED"
            if lost:
                self.save()
        self.stopped.set()

    def alive(self) -> list[str]:
        return [link.name for link in self.links if not link.down]

    def record_sent(self, values: dict, step: int) -> None:
        with self.lock:
            sent_through = self.state.setdefault("sent_through", {})
            newer = [tag for tag in values if step > sent_through.get(tag, -1)]
            if newer:
                sent_through.update(dict.fromkeys(newer, step))
                self.save()

    def read_board(self) -> dict | None:
        """The run's TensorBoard scalars, read once for all trackers."""
        with self.board_lock:
            if not self.board_read:
                self.board, self.board_read = read_board(self.run_dir), True
            return self.board

    def save(self) -> None:
        with self.lock:
            try:
                atomic_write_json(self.path, self.state)
            except OSError as exc:
                if not self.save_failed:
                    self.save_failed = True
                    say(f"warning: {self.path}: cannot write ({cause(exc)}); a resume may start new tracker runs "
                        f"or send steps twice")


class Link:
    """One tracker, on a thread of its own: it starts the tracker, sends it what it missed in
    earlier jobs (when it is ``behind``), then each value queued, then closes its run. A call that
    fails, or that ``check`` finds unanswered too long, sets it aside: one warning, its progress
    saved as ``behind``, and its client let go of."""

    def __init__(self, hub: Trackers, name: str):
        self.hub, self.name, self.kind = hub, name, KINDS[name]
        saved = hub.state.get(name) or {}
        self.behind: dict | None = saved.get("behind")  # None: it has had everything sent so far
        # No step twice. TensorBoard hides what an interrupted run logged after its checkpoint
        # (purge_step); the others cannot take values back, so the highest step of each scalar sent
        # to them is recorded before it is sent, and a resume sends only the steps above it: training
        # resumes exactly, so the values of the steps it redoes are those already sent (throughput
        # aside). Per scalar, because validation logs at the step of the epoch's last training
        # values: a job killed while it validates has sent those, not the validation's.
        # So each tracker has a highest step per scalar, and gets a value only above it.
        self.has: dict[str, int] = dict(self.behind if self.behind is not None else hub.state.get("sent_through") or {})
        # trackers.json of an earlier version: one step for every scalar
        self.has_all_through = int(hub.state.get("logged_through", -1)) if self.behind is None else -1
        self.caught_up = self.behind is None
        self.tracker, self.where, self.report = None, "", ""
        self.down = False
        self.call: tuple[str, float, float] | None = None  # the call under way: (what, since, limit)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.work, name=f"tracker {name}", daemon=True)

    def work(self) -> None:
        hub = self.hub
        saved = dict(hub.state.get(self.name) or {})
        try:
            tracker, ids, where = self.timed("starting", START_WAIT_S, self.kind.start, hub.config, saved, hub.values)
        except Exception as exc:  # unreachable, refused, misconfigured: this tracker is off, training goes on
            self.set_down(f"cannot start ({cause(exc)})")
            return
        self.tracker, self.where = tracker, redact(where)
        with hub.lock:
            if self.down:  # it took too long: set aside meanwhile
                self.let_go()
                return
            hub.state[self.name] = {**saved, **ids}
            hub.save()
        say(f"{self.name}: logging to {self.where}")
        if not self.caught_up and not self.catch_up():
            return
        while (item := self.queue.get()) is not None:
            values, step = item
            unsent = {tag: value for tag, value in values.items()
                      if step > max(self.has_all_through, self.has.get(tag, -1))}
            if unsent:
                hub.record_sent(unsent, step)
                if not self.send(unsent, step, f"logging at step {step}"):
                    return
        try:
            self.timed("closing its run", DOWN_AFTER_S, self.kind.close, self.tracker, hub.failed)
        except Exception as exc:
            self.set_down(f"closing its run failed ({cause(exc)})")
            return
        with hub.lock:
            if not self.down and self.caught_up and "behind" in hub.state[self.name]:
                del hub.state[self.name]["behind"]
                hub.state[self.name].pop("end_as", None)
                hub.save()

    def catch_up(self) -> bool:
        """Send what it missed in earlier jobs: each value of TensorBoard's events above its
        ``behind`` step (up to the step this job resumed from: the job sends what follows) that
        its own store does not hold. False if it was set aside meanwhile."""
        hub = self.hub
        behind = self.behind if self.kind.keeps_what_it_took else {}
        board = hub.read_board() if hub.catch_up_through is not None else None
        if board is None:
            say(f"warning: {self.name}: what it missed in earlier jobs is not sent: {hub.run_dir / 'tensorboard'} has "
                f"none of it (TensorBoard is not among train.log_with)")
            return True
        wanted = {tag: [(step, value) for step, value in points if behind.get(tag, -1) < step <= hub.catch_up_through]
                  for tag, points in board.items()}
        wanted = {tag: points for tag, points in wanted.items() if points}
        missing: dict[int, dict[str, float]] = {}
        if wanted:
            try:
                held = self.timed("reading what it holds", START_WAIT_S, self.kind.held, self.tracker, hub.run_dir,
                                  sorted(wanted))
            except Exception as exc:
                self.set_down(f"reading what it holds failed ({cause(exc)})")
                return False
            for tag, points in wanted.items():
                for step, value in points:
                    if step not in held.get(tag, ()):
                        missing.setdefault(step, {})[tag] = value
        for step in sorted(missing):
            hub.record_sent(missing[step], step)  # a later resume redoing these steps does not send them again
            if not self.send(missing[step], step, f"sending step {step}, which it had missed"):
                return False
        count = sum(map(len, missing.values()))
        scalars = len({tag for values in missing.values() for tag in values})
        self.report = (f"{self.name}: sent {count} value{'s' if count != 1 else ''} it had missed"
                       + (f" ({scalars} scalars, steps {min(missing)} to {max(missing)})" if missing else ""))
        self.caught_up = True
        hub.report(self.report)
        return True

    def send(self, values: dict, step: int, what: str) -> bool:
        try:
            self.timed(what, DOWN_AFTER_S, self.kind.log, self.tracker, values, step)
        except Exception as exc:
            self.set_down(f"{what} failed ({cause(exc)})")
            return False
        with self.hub.lock:
            if self.down:
                return False
            for tag in values:
                self.has[tag] = max(step, self.has.get(tag, -1))
        return True

    def timed(self, what: str, limit_s: float, function: Callable, *args):
        self.call = (what, time.monotonic(), limit_s)
        try:
            return function(*args)
        finally:
            self.call = None

    def check(self) -> None:
        """Set it aside if the call under way has gone unanswered past its limit (from another thread)."""
        call = self.call
        if call is not None and time.monotonic() - call[1] > call[2]:
            self.set_down(f"{call[0]}: no answer in {call[2]:g} s")

    def set_down(self, reason: str) -> None:
        hub = self.hub
        with hub.lock:
            if self.down:
                return
            self.down = True
            hub.state.setdefault(self.name, {})["behind"] = dict(self.has)
        say(f"warning: {self.name}: {reason}; off for the rest of the run ({hub.when_down})")
        hub.save()
        if self.tracker is not None:  # its thread may be stuck in the client: let go from another
            threading.Thread(target=self.let_go, name=f"letting go of {self.name}", daemon=True).start()

    def let_go(self) -> None:
        try:
            self.kind.let_go(self.tracker)
        except Exception:
            pass  # it is set aside already; this only keeps its client from holding up the exit


# ------------------------------------------------------------------------------------------ sync
def sync(run_dir: Path) -> int:
    """Send each tracker that a job of ``run_dir`` set aside what it missed, from the run's
    TensorBoard events, and end its run. 0: every tracker has everything; 1: one could not be
    reached (run it again later); 2: not a run directory that logged to these trackers."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return error(f"{path}: not found; sync needs a run directory whose trackers logged to MLflow, W&B or Aim")
    state = read_state(path)
    names = [name for name in KINDS if isinstance(state.get(name), dict)]
    behind = [name for name in names if "behind" in state[name]]
    for name in names:
        if name not in behind:
            print(f"{name}: nothing missed")
    if not behind:
        return 0
    try:
        require_installed(behind)
        config = load_config(run_dir / "config.yaml", [f"output_dir={run_dir.parent}", f"name={run_dir.name}"])
    except ConfigError as exc:
        return error(str(exc))
    if read_board(run_dir) is None:
        return error(f"{run_dir / 'tensorboard'}: no TensorBoard scalars to send (train.log_with left it out)")
    from accelerate import PartialState

    PartialState()  # Accelerate's trackers log through it, as in a job
    # A job that died before its end left no end_as: its tracker's run failed.
    failed = any(state[name].get("end_as", "FAILED") == "FAILED" for name in behind)
    try:
        with acquire(run_dir):  # no job of the run is sending at the same time
            hub = Trackers(config, None, behind, catch_up_through=math.inf, report=lambda line: None,
                           when_down="run sync again once it answers")
            hub.finish(failed=failed, wait_s=math.inf)  # as long as each tracker answers
    except RunDirInUse as exc:
        return error(str(exc))
    for link in hub.links:
        if link.down:
            continue
        line = f"{link.report}; its run ended {'FAILED' if failed else 'FINISHED'}"
        if link.name == "wandb" and "(offline)" in link.where:
            line += f"; upload the run's folders with: wandb sync {run_dir / 'wandb'}/offline-run-*"
        print(line)
    return 1 if any(link.down for link in hub.links) else 0


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train.trackers",
                                     description="The run's trackers besides TensorBoard: MLflow, W&B and Aim.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = commands.add_parser(
        "sync", help="send each tracker what it missed of a run, from the run's TensorBoard events",
        description="Send each tracker that a job of the run set aside (its server lost) every value it does "
                    "not hold, from the run's TensorBoard events, and end its run. Exit code 0: all sent; 1: a "
                    "tracker could not be reached (run it again later); 2: not such a run directory.")
    command.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (runs/NAME)")
    args = parser.parse_args(argv)
    return sync(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
