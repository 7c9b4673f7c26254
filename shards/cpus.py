"""The CPUs this process may use, which sizes every pool of workers and torch's threads.

``os.sched_getaffinity`` alone overcounts in two common places: a container whose CPU limit is
a quota (Kubernetes' ``resources.limits.cpu``, ``docker --cpus``: the cgroup's ``cpu.max``, all
cores still in the affinity), and a SLURM job on a shared node without task binding
(``TaskPlugin=task/none``: the allocation is in ``SLURM_CPUS_ON_NODE`` only). Threads sized by the
affinity there oversubscribe the cores the process really gets: with OpenMP's spinning threads a
step takes ten times as long (two 2-thread processes on 2 cores: 0.60 s a GoogLeNet step against
0.06 s with one thread each).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")  # this process's cgroup in each hierarchy


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP, environ: dict | None = None) -> int:
    """The affinity's CPUs, capped by the cgroup CPU quota and by SLURM's allocation on this node."""
    environ = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root, membership)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))  # a quota of 1.5 CPUs keeps one thread busy, not two
    allocated = environ.get("SLURM_CPUS_ON_NODE", "")
    if allocated.isdigit() and int(allocated) > 0:
        cpus = min(cpus, int(allocated))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> float | None:
    """The tightest CPU quota (CPUs' worth of time per period) on this process's cgroup and its
    ancestors, cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None
    when there is none or it cannot be read."""
    quotas = []
    for line in read_text(membership).splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            quotas += [parse_cpu_max(read_text(d / "cpu.max")) for d in ancestors(root, path)]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            mount = next((root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / name).is_dir()), None)
            if mount is not None:
                quotas += [parse_cfs(read_text(d / "cpu.cfs_quota_us"), read_text(d / "cpu.cfs_period_us"))
                           for d in ancestors(mount, path)]
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def ancestors(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and its parents up to ``mount``, those that exist. Inside a container's
    cgroup namespace the path is ``/`` and the mount is the container's own cgroup."""
    parts = [p for p in path.strip("/").split("/") if p]
    found = [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [d for d in found if d.is_dir()]


def parse_cpu_max(text: str) -> float | None:
    """``cpu.max``: "QUOTA PERIOD" in microseconds, or "max PERIOD" (no limit)."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1's quota (-1: no limit) over its period."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
