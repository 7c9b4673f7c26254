"""SLURM, for real: a two-node cluster started on this host (see slurm_cluster.py), jobs
submitted through the project's own helper and batch scripts with the real ``sbatch``."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, subprocess_env
from slurm_cluster import SlurmCluster, missing_binaries
from test_train import TINY, final_weights, metrics, scalars

# The same job for the uninterrupted and the preempted run: 2 nodes x 1 CPU process (gloo).
JOB = [*TINY, "schedule.epochs=3", "data.workers=1", "ema.enabled=true", "train.log_every_steps=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if missing_binaries():
        pytest.skip(f"SLURM binaries missing: {missing_binaries()} (bash scripts/setup.sh --test installs them)")
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()


def events(run_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator.Scalars(tag)


def submit(cluster: SlurmCluster, *args: str) -> tuple[str, str]:
    env = {**subprocess_env(), **cluster.env}
    result = subprocess.run([sys.executable, "-m", "pipeline.ops.slurm", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return re.search(r"submitted job (\d+)", result.stdout).group(1), result.stdout


# How long a test waits for a training job: a guard against a hung job, not a speed bound (the
# jobs' own limit is 20 minutes; a loaded 2-core machine took over 300 s for one that needs 90).
JOB_WAIT_S = 1200


def train_job(cluster, tiny_data, out: Path, name: str) -> tuple[str, Path]:
    job, printed = submit(cluster, "submit", "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "1",
                          "--time", "00:20:00", *JOB, f"data.dir={tiny_data}", f"output_dir={out}", f"name={name}")
    run_dir = out / name
    assert f"log: {run_dir}/slurm-{job}.out" in printed and f"tensorboard --logdir {run_dir}/tensorboard" in printed
    return job, run_dir


def failure_excerpt(log: str) -> str:
    """A failed job's log as the assertion shows it: where each stalled process was (its stall
    report, pipeline.ops.stall_watch), then the end of the log."""
    stalls = [log[m.start():m.start() + 3000] for m in re.finditer(r"process \d+: no progress for ", log)]
    return "\n[...]\n".join([*stalls, log[-4000:]])


def test_dry_run_renders_the_batch_script_with_quoted_arguments(tmp_path):
    odd = tmp_path / "it's a dir"
    result = subprocess.run([sys.executable, "-m", "pipeline.ops.slurm", "submit", "--nodes", "3", "--gpus-per-node", "8",
                             "--partition", "gpu", "--time", "1-00:00:00", "--account", "lab", "--dry-run",
                             f"output_dir={odd}", "optim.lr=0.1"], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ["#SBATCH --nodes=3", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --signal=USR2@120", "#SBATCH --partition=gpu", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --account=lab", "export GOOGLENET_PROCS_PER_NODE=8"]:
        assert line in script, line
    assert "(sbatch argument) --output=" in script  # a path with a quote: passed on sbatch's command line
    assert """'output_dir=""" in script and "optim.lr=0.1" in script
    assert '--machine_rank "$SLURM_NODEID"' in script  # expanded per task, inside srun
    bad = subprocess.run([sys.executable, "-m", "pipeline.ops.slurm", "submit", "--dry-run", "optim.lrr=1"], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown key 'optim.lrr'" in bad.stderr


@pytest.mark.slow
def test_two_node_training_job(cluster, tiny_data, tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "slurm runs 'quoted'"  # spaces and quotes survive
    submitted_at = time.time()
    job, run_dir = train_job(cluster, tiny_data, out, "straight")
    state = cluster.wait_for(job, timeout=JOB_WAIT_S)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", failure_excerpt(log)
    # each node's process gets the 1 CPU SLURM allocated it, not the host's 2 (no task binding here)
    assert "2 nodes x 1 processes" in log and "2 processes on cpu (1 thread each)" in log
    assert "parameters identical on all 2 processes" in log
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [12, 24, 36] and all(r["val_samples"] == 16 for r in records)
    tags = scalars(run_dir)
    assert [s for s, _ in tags["val/top1_error"]] == [12, 24, 36] and "val/top5_error" in tags
    first_step = min(e.wall_time for e in events(run_dir, "train/loss"))
    print(f"\nSLURM figure: submission to first training step {first_step - submitted_at:.1f}s", file=sys.stderr)


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_finishes_like_an_uninterrupted_one(cluster, tiny_data, tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "slurm runs 'quoted'"
    straight = out / "straight"
    if not (straight / "metrics.jsonl").is_file():
        pytest.skip("needs the uninterrupted run of test_two_node_training_job")
    job, run_dir = train_job(cluster, tiny_data, out, "preempted")
    tensorboard = run_dir / "tensorboard"
    deadline = time.time() + JOB_WAIT_S
    while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():  # into epoch 2
        time.sleep(0.2)
    time.sleep(1.0)
    signalled_at = time.time()
    cluster.run("scancel", "--signal=USR2", job)  # what --signal=USR2@120 sends before the time limit
    state = cluster.wait_for(job, timeout=JOB_WAIT_S)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", failure_excerpt(log)
    assert "checkpoint written; job " + job + " requeued" in log
    assert "start 2:" in log and "resumed from" in log
    stopped = int(log.split("stopped at step ")[1].split()[0])
    assert 12 < stopped < 36
    resumed = final_weights(run_dir)
    reference = final_weights(straight)
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [s for s, _ in scalars(run_dir)["train/loss"]] == list(range(1, 37))  # no step lost or twice
    assert [r["step"] for r in metrics(run_dir)] == [12, 24, 36]
    resumed_at = min(e.wall_time for e in events(run_dir, "train/loss") if e.step == stopped + 1)
    print(f"\nSLURM figure: preemption, signal to resumed training {resumed_at - signalled_at:.1f}s", file=sys.stderr)
    assert tensorboard.is_dir()


def sources_and_single_run(tmp_path: Path) -> list[str]:
    """Class folders in ``tmp_path``, prepared by one process into ``tmp_path/single``; the
    ``shards`` arguments (without --out) an array preparation of them takes."""
    from imagefiles import class_folders

    class_folders(tmp_path / "train", {"a": 7, "b": 6, "c": 5})
    class_folders(tmp_path / "val", {"a": 2, "b": 2, "c": 2})
    common = ["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--shard-size", "3"]
    single = subprocess.run([sys.executable, "-m", "data_prep", "shards", *common, "--out", str(tmp_path / "single")],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    return common


@pytest.mark.slow
def test_preparation_array_and_finalize_match_a_single_run(cluster, tmp_path):
    common = sources_and_single_run(tmp_path)
    env = {**subprocess_env(), **cluster.env}
    result = subprocess.run([sys.executable, "-m", "pipeline.ops.slurm", "submit-prep", "--tasks", "3", "--",
                             *common, "--out", str(tmp_path / "array"), "--workers", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    array_job, finalize_job = re.search(r"submitted array job (\d+) .* finalize job (\d+)", result.stdout).groups()
    assert cluster.wait_for(finalize_job, timeout=300) == "COMPLETED", result.stdout
    logs = sorted((tmp_path / "array-logs").glob("prep-*.out"))
    assert len(logs) == 3 and all(f"_{i}.out" in logs[i].name for i in range(3))
    assert (tmp_path / "array" / "manifest.json").read_bytes() == (tmp_path / "single" / "manifest.json").read_bytes()
    assert json.loads((tmp_path / "array" / "manifest.json").read_text())["totals"]["written"] == 24
    assert array_job != finalize_job


@pytest.mark.slow
def test_preparation_array_into_an_object_store_matches_a_single_run(cluster, s3_server, tmp_path):
    """The same array preparation with --out s3://...: every task uploads its shards, finalize
    uploads the manifest, which is byte for byte the single local run's."""
    common = sources_and_single_run(tmp_path)
    s3_server.make_bucket("slurm-prep")
    env = {**subprocess_env(), **cluster.env, **s3_server.env()}
    result = subprocess.run([sys.executable, "-m", "pipeline.ops.slurm", "submit-prep", "--tasks", "3", "--",
                             *common, "--out", "s3://slurm-prep/array", "--workers", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    finalize_job = re.search(r"finalize job (\d+)", result.stdout).group(1)
    assert cluster.wait_for(finalize_job, timeout=300) == "COMPLETED", result.stdout
    manifest = s3_server.client().get_object(Bucket="slurm-prep", Key="array/manifest.json")["Body"].read()
    assert manifest == (tmp_path / "single" / "manifest.json").read_bytes()
    keys = s3_server.list_keys("slurm-prep", "array/")
    assert len([k for k in keys if k.endswith(".tar")]) == len(json.loads(manifest)["splits"]["train"]["shards"]) + \
        len(json.loads(manifest)["splits"]["val"]["shards"])
