"""The CPUs a process may use (shards.cpus): the affinity, capped by a cgroup CPU quota (v2's
``cpu.max``, v1's CFS quota, on the process's cgroup or an ancestor) and by SLURM's allocation on
the node. The cgroup trees here are folders laid out as the kernel lays out /sys/fs/cgroup, with
the membership file /proc/self/cgroup would give inside such a container."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env

from shards.cpus import cgroup_cpu_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_tree(root: Path, files: dict[str, str], membership: str) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "membership").write_text(membership)
    return root / "membership"


def test_a_v2_quota_on_an_ancestor_caps_the_cpus(tmp_path):
    """A pod limited to 1.5 CPUs (Kubernetes writes the limit on the pod's cgroup, the container's
    own says "max"): one busy thread, not two."""
    membership = cgroup_tree(tmp_path, {"cgroup/cpu.max": "max 100000\n",
                                        "cgroup/kubepods/pod1/cpu.max": "150000 100000\n",
                                        "cgroup/kubepods/pod1/c1/cpu.max": "max 100000\n"},
                             "0::/kubepods/pod1/c1\n")
    assert cgroup_cpu_quota(tmp_path / "cgroup", membership) == 1.5
    assert usable_cpus(tmp_path / "cgroup", membership, environ={}) == 1


def test_a_v2_quota_inside_a_cgroup_namespace(tmp_path):
    membership = cgroup_tree(tmp_path, {"cgroup/cpu.max": "400000 100000\n"}, "0::/\n")
    assert cgroup_cpu_quota(tmp_path / "cgroup", membership) == 4.0
    assert usable_cpus(tmp_path / "cgroup", membership, environ={}) == min(AFFINITY, 4)


def test_a_v1_cfs_quota_caps_the_cpus(tmp_path):
    membership = cgroup_tree(tmp_path, {"cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000\n",
                                        "cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                                        "cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                        "cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                             "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_quota(tmp_path / "cgroup", membership) == 1.0
    assert usable_cpus(tmp_path / "cgroup", membership, environ={}) == 1


def test_no_quota_and_no_allocation_leave_the_affinity(tmp_path):
    membership = cgroup_tree(tmp_path, {"cgroup/cpu.max": "max 100000\n",
                                        "cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                        "cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                             "0::/\n3:cpu,cpuacct:/\n")
    assert cgroup_cpu_quota(tmp_path / "cgroup", membership) is None
    assert usable_cpus(tmp_path / "cgroup", membership, environ={}) == AFFINITY
    assert usable_cpus(tmp_path / "missing", tmp_path / "missing", environ={}) == AFFINITY  # nothing readable


def test_slurms_allocation_on_the_node_caps_the_cpus(tmp_path):
    """Without task binding (TaskPlugin=task/none) the allocation is in the environment only."""
    nothing = tmp_path / "missing"
    assert usable_cpus(nothing, nothing, environ={"SLURM_CPUS_ON_NODE": "1"}) == 1
    assert usable_cpus(nothing, nothing, environ={"SLURM_CPUS_ON_NODE": "512"}) == AFFINITY
    assert usable_cpus(nothing, nothing, environ={"SLURM_CPUS_ON_NODE": "0"}) == AFFINITY  # not an allocation


@pytest.mark.slow
@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs to show the cap")
def test_the_trainer_gives_each_process_its_share_of_the_allocation(tiny_data, tmp_path):
    """One process on a 2-CPU machine of which SLURM allocated it 1: one torch thread, said in
    the start-up line."""
    script = ("import sys\nfrom pipeline.config import load_config\nfrom pipeline.data.prepared import open_prepared\n"
              "from pipeline.train.run import build_run, describe\n"
              "run = build_run(load_config(None, sys.argv[1:]), open_prepared(sys.argv[1].split('=', 1)[1]))\n"
              "print(describe(run))\n")
    lines = {}
    for allocated in ("1", ""):
        env = subprocess_env() | {"SLURM_CPUS_ON_NODE": allocated}
        result = subprocess.run([sys.executable, "-c", script, f"data.dir={tiny_data}", f"output_dir={tmp_path}",
                                 f"name=cpus{allocated}"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        lines[allocated] = result.stdout
    assert "1 process on cpu (1 thread each)" in lines["1"]
    assert f"1 process on cpu ({AFFINITY} threads each)" in lines[""]
