"""A real two-node SLURM cluster on this host, for the tests: munged, slurmctld and two slurmd
daemons (node1, node2: same host, NodeAddr 127.0.0.1, own ports), all in a temporary
directory with their own ports and socket, stopped afterwards."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sacct")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES[:5] if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = Path(root)
        self.cpus = cpus_per_node
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.root / "slurm.conf")
        return env

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool/node1", "spool/node2", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld, node1, node2 = _free_ports(3)
        host = socket.gethostname()
        # cred_expire is also how long a requeued job is held before it may start again (120 s by
        # default); bf_interval how often the backfill scheduler looks (30 s): both shortened so
        # the preemption test waits for the trainer, not for the scheduler.
        (r / "slurm.conf").write_text(f"""\
ClusterName=testcluster
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=20
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={node1} CPUs={self.cpus} State=UNKNOWN
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={node2} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, *command: str) -> None:
        log = open(self.root / "log" / f"{Path(command[0]).name}-{len(self.procs)}.out", "w")
        self.procs.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        r = self.root
        self._spawn(_sbin("munged"), "--foreground", "--force", f"--socket={r}/munge/munge.socket",
                    f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                    f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed")
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), timeout, "munged")
        self._spawn(_sbin("slurmctld"), "-D", "-i", "-f", str(r / "slurm.conf"))
        for node in ("node1", "node2"):
            self._spawn(_sbin("slurmd"), "-D", "-N", node, "-f", str(r / "slurm.conf"))
        self._wait(self._nodes_idle, timeout, "two idle nodes")
        return self

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return states.get("node1") == "idle" and states.get("node2") == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*")))
        raise RuntimeError(f"SLURM test cluster: {what} not ready\n{logs}")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_for(self, job_id: str, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.state(job_id)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return state
            time.sleep(1)
        return "TIMEOUT_WAITING"

    def stop(self) -> None:
        self.run("scancel", "--partition=debug", check=False)  # no job outlives the cluster
        time.sleep(1)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
