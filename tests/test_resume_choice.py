"""Which checkpoint a job resumes from is rank 0's choice: a rank whose view of the shared disk
is late (another node's NFS directory cache hides a new ``step-N`` for up to a minute) waits for
it instead of resuming from an older one, and one that never sees it ends the job with one line.

The late view is injected where the directory is looked at: a ``sitecustomize`` on rank 1's
``PYTHONPATH`` hides the newest ``step-*`` of one checkpoints folder from ``os.listdir``,
``os.scandir`` and ``os.stat`` for some seconds after the process first looks into it."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from test_train import TINY, final_weights, launch, launch_command

pytestmark = pytest.mark.slow

# 2 processes x 4 images: 12 updates per epoch; checkpoints at steps 2 and 4, then resumed to 6.
ARGS = [*TINY, "schedule.epochs=1", "train.checkpoint_every_steps=2"]
HIDE_S = 5  # how long rank 1 does not see the newest checkpoint in the late case

HOOK = '''
import errno, os, re, time

_folder, _rank, _seconds = os.environ["HIDE_NEWEST_CHECKPOINT"].split("|")
if os.environ.get("RANK") == _rank:
    _folder = os.path.abspath(_folder)
    _listdir, _scandir, _stat, _lstat = os.listdir, os.scandir, os.stat, os.lstat
    _hidden = {}

    def _hidden_name():
        """The newest step-* when the process first looks into the folder, for _seconds from then."""
        if not _hidden:
            steps = sorted(n for n in _listdir(_folder) if re.fullmatch(r"step-[0-9]{8}", n))
            _hidden.update(name=steps[-1] if steps else None, until=time.monotonic() + float(_seconds))
        return _hidden["name"] if time.monotonic() < _hidden["until"] else None

    def _absolute(path):
        return None if isinstance(path, int) else os.path.abspath(os.fsdecode(path))

    def _is_hidden(path):
        path = _absolute(path)
        if path is None or not (path == _folder or path.startswith(_folder + os.sep)):
            return False
        name = _hidden_name()
        target = os.path.join(_folder, name) if name else None
        return target is not None and (path == target or path.startswith(target + os.sep))

    def listdir(path="."):
        names = _listdir(path)
        if _absolute(path) == _folder:
            names = [n for n in names if n != _hidden_name()]
        return names

    class _Filtered:
        def __init__(self, entries, name):
            self.entries, self.name = entries, name

        def __iter__(self):
            return self

        def __next__(self):
            while True:
                entry = next(self.entries)
                if entry.name != self.name:
                    return entry

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.entries.close()

        def close(self):
            self.entries.close()

    def scandir(path="."):
        entries = _scandir(path)
        return _Filtered(entries, _hidden_name()) if _absolute(path) == _folder else entries

    def _missing(path):
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(path))

    def stat(path, *args, **kwargs):
        if _is_hidden(path):
            raise _missing(path)
        return _stat(path, *args, **kwargs)

    def lstat(path, *args, **kwargs):
        if _is_hidden(path):
            raise _missing(path)
        return _lstat(path, *args, **kwargs)

    os.listdir, os.scandir, os.stat, os.lstat = listdir, scandir, stat, lstat
'''


def hidden_env(tmp_path: Path, checkpoints: Path, seconds: float) -> dict:
    """The environment of a launch in which rank 1 does not see the newest checkpoint for ``seconds``."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = subprocess_env()
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    env["HIDE_NEWEST_CHECKPOINT"] = f"{checkpoints}|1|{seconds}"
    return env


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_data, tmp_path_factory) -> Path:
    """A 2-process run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("choice")
    launch(2, *ARGS, f"data.dir={tiny_data}", f"output_dir={out}", "name=first", "train.max_steps=4", cwd=out)
    run_dir = out / "first"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    return run_dir


def copy_run(run_dir: Path, out: Path, name: str) -> Path:
    shutil.copytree(run_dir, out / name)
    return out / name


def test_a_rank_that_sees_the_newest_checkpoint_late_waits_and_resumes_with_rank_0(tiny_data, two_checkpoints,
                                                                                    tmp_path):
    """Rank 1 does not see step-4 for 5 s: it waits (up to half of train.collective_timeout_s,
    30 s here) and resumes from step 4 as rank 0 does; the run ends as the one no rank was late in."""
    late, plain = copy_run(two_checkpoints, tmp_path, "late"), copy_run(two_checkpoints, tmp_path, "plain")
    args = [*ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "train.max_steps=6",
            "train.collective_timeout_s=60"]
    environments = {"late": hidden_env(tmp_path, late / "checkpoints", HIDE_S), "plain": subprocess_env()}
    processes = {name: subprocess.Popen(launch_command(2, *args, f"name={name}"), cwd=tmp_path, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for name, env in environments.items()}
    try:
        stderr = {name: process.communicate(timeout=600)[1] for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()
    for name, process in processes.items():
        assert process.returncode == 0, f"{name}:\n{stderr[name][-4000:]}"
    newest = late / "checkpoints" / "step-00000004"
    assert f"process 1: waiting for {newest}" in stderr["late"], stderr["late"][-4000:]  # it was hidden
    for rank in (0, 1):
        assert f"process {rank}: resumed from {newest} (step 4)" in stderr["late"], stderr["late"][-4000:]
    assert "parameters identical on all 2 processes" in stderr["late"]
    ours, reference = final_weights(late), final_weights(plain)
    assert sorted((late / "checkpoints").glob("step-*"))[-1].name == "step-00000006"
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key


def test_a_rank_that_never_sees_the_chosen_checkpoint_ends_the_job_with_one_line(tiny_data, two_checkpoints,
                                                                                 tmp_path):
    """Rank 1 never sees step-4: after half of train.collective_timeout_s (10 s) every rank stops,
    with one line naming the checkpoint, before any collective times out."""
    never = copy_run(two_checkpoints, tmp_path, "never")
    args = [*ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=never", "train.max_steps=6",
            "train.collective_timeout_s=20"]
    result = subprocess.run(launch_command(2, *args), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=hidden_env(tmp_path, never / "checkpoints", seconds=1e9))
    newest = never / "checkpoints" / "step-00000004"
    assert result.returncode != 0, result.stderr[-4000:]
    lines = error_lines(result.stderr)
    print(lines)
    assert len(lines) == 1, result.stderr[-4000:]
    assert str(newest) in lines[0] and "process 1" in lines[0] and "10 s" in lines[0]
    assert "collective operation timed out" not in result.stderr
    assert "resumed from" not in result.stderr  # no rank loaded anything
    assert sorted(p.name for p in (never / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
