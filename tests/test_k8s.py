"""Kubernetes (Kubeflow Trainer v2, pipeline/ops/k8s.py), without a cluster: the rendered
manifests checked against the Trainer API's own models with unknown fields refused; the
container's contract run for real (two "pods" on 127.0.0.1, each with only the variables the
runtime injects, through the entry command the manifest holds); submission through the
Kubernetes Python client to a local stand-in for the API server."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import ROOT
from test_faults import same_weights, steps_saved, wait_for
from test_train import TINY, free_port, scalars

from pipeline.ops.k8s import api_problems, main

IMAGE = "registry.example.com/googlenet:1.0"
TWO_BY_EIGHT = ["--config", "configs/imagenet_bn.yaml", "--nodes", "2", "--gpus-per-node", "8", "--image", IMAGE,
                "--volume", "imagenet=/data", "--volume", "runs=/runs", "--data", "/data/imagenet-shards",
                "--output", "/runs"]


def render(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["render", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def rendered(capsys, *argv: str) -> tuple[dict, dict, str]:
    code, out, err = render(capsys, *argv)
    assert code == 0, err
    runtime, job = yaml.safe_load_all(out)
    return runtime, job, out


def test_the_2x8_manifests_fit_the_trainer_api_and_say_how_to_stop(capsys):
    runtime, job, text = rendered(capsys, *TWO_BY_EIGHT)
    assert api_problems([runtime, job]) == []
    assert (runtime["kind"], job["kind"]) == ("TrainingRuntime", "TrainJob")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    script = trainer["command"][2]
    assert trainer["command"][:2] == ["/bin/bash", "-c"] and "exec torchrun " in script
    for flag, variable in [("--nnodes", "PET_NNODES"), ("--nproc_per_node", "PET_NPROC_PER_NODE"),
                           ("--node_rank", "PET_NODE_RANK"), ("--master_addr", "PET_MASTER_ADDR"),
                           ("--master_port", "PET_MASTER_PORT")]:
        assert f'{flag} "${variable}"' in script
    # A restart must find the same run directory, whatever the recipe in the image says.
    assert trainer["args"] == ["--config", "configs/imagenet_bn.yaml", "name=imagenet_bn", "output_dir=/runs",
                               "data.dir=/data/imagenet-shards"]
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"]["rules"] == [{"name": "restartAfterDisruption",
                                                 "action": "RestartJobSetAndIgnoreMaxRestarts",
                                                 "onJobFailureReasons": ["PodFailurePolicy"]}]
    node = jobset["replicatedJobs"][0]
    assert node["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert node["template"]["spec"]["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    assert node["template"]["spec"]["backoffLimit"] == 1  # the other node's exit does not fail the Job first
    pod = pod_spec(runtime)
    assert pod["restartPolicy"] == "Never"
    # torchvision's GoogLeNet with its auxiliary heads for 1,000 classes; weights, momentum, EMA
    assert "13,004,888 parameters x 12 bytes" in text
    assert pod["terminationGracePeriodSeconds"] == 92 == 60 + 30 + 2  # 156 MB at 100 MB/s: 1.6 s, rounded up
    assert {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "87"} in trainer["env"]


def pod_spec(runtime: dict) -> dict:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def test_a_misspelled_field_or_a_wrong_type_is_refused(capsys):
    runtime, job, _ = rendered(capsys, *TWO_BY_EIGHT)
    misspelled = copy.deepcopy(runtime)
    pod_spec(misspelled)["terminationGracePeriodSecond"] = pod_spec(misspelled).pop("terminationGracePeriodSeconds")
    assert api_problems([misspelled, job]) == [
        "TrainingRuntime: spec.template.spec.replicatedJobs[0].template.spec.template.spec."
        "terminationGracePeriodSecond: unknown field"]
    procs = copy.deepcopy(job)
    procs["spec"]["trainer"]["numProcsPerNode"] = procs["spec"]["trainer"].pop("numProcPerNode")
    assert api_problems([runtime, procs]) == ["TrainJob: spec.trainer.numProcsPerNode: unknown field"]
    typed = copy.deepcopy(job)
    typed["spec"]["trainer"]["numNodes"] = "2"
    [problem] = api_problems([runtime, typed])
    assert problem.startswith("TrainJob: numNodes: Input should be a valid integer")


@pytest.mark.parametrize("change, message", [
    ({"--nodes": "0"}, "--nodes 0: at least 1"),
    ({"--gpus-per-node": "3"}, "--gpus-per-node 3: a node has 1, 2, 4, 8 GPUs (--max-gpus-per-node 8), or 0"),
    ({"--gpus-per-node": "16"}, "--gpus-per-node 16: a node has 1, 2, 4, 8 GPUs"),
    ({"--image": None}, "--image: required, the container image"),
    ({"--output": "s3://bucket/runs"}, "--output s3://bucket/runs: the trainer writes its run directory"),
    ({"--output": "/scratch/runs"}, "--output /scratch/runs: on no mounted volume (mounted: /data, /runs)"),
    ({"--data": "/elsewhere/shards"}, "--data /elsewhere/shards: on no mounted volume"),
    ({"--env": "PET_NNODES=4"}, "--env PET_NNODES: set by the runtime"),
    ({"--config": "/etc/hostname"}, "--config /etc/hostname: "),
])
def test_bad_input_gives_one_line(capsys, change, message):
    argv = list(TWO_BY_EIGHT)
    for option, value in change.items():
        if option in argv:
            at = argv.index(option)
            del argv[at:at + 2]
        if value is not None:
            argv += [option, value]
    code, out, err = render(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err


def documented_render(page: Path) -> tuple[list[str], str]:
    """The render command of the page's 2 x 8 section (a bash block) and the YAML block after it."""
    text = page.read_text()
    text = text[text.index("## The manifest for 2 nodes x 8 GPUs"):]
    command = re.search(r"```bash\n((?:python -m pipeline\.ops\.k8s|googlenet k8s) render .*?)\n```", text,
                        re.S).group(1)
    manifest = re.search(r"```yaml\n(.*?)```", text[text.index(command):], re.S).group(1)
    words = shlex.split(command.replace("\\\n", " "))
    return words[words.index("render"):], manifest


def test_the_docs_show_the_manifest_the_command_renders(capsys):
    argv, shown = documented_render(ROOT / "docs" / "kubernetes.md")
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == shown


# --- submission: the Kubernetes Python client against a stand-in for the API server ---------

class FakeApiServer(ThreadingHTTPServer):
    """Just enough of the API server for namespaced custom objects: GET, POST (409 if the name
    exists), PUT; it records each request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ApiHandler)
        self.objects: dict[tuple[str, str, str], dict] = {}  # (namespace, plural, name) -> object
        self.requests: list[tuple[str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": f"http://127.0.0.1:{self.server_address[1]}"}}],
            "users": [{"name": "me", "user": {"token": "t"}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me", "namespace": "team"}}]}))
        return path


class _ApiHandler(BaseHTTPRequestHandler):
    PATH = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/([a-z]+)(?:/([^/?]+))?")

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        namespace, plural, name = self.PATH.match(self.path).groups()
        self.server.requests.append((self.command, f"{plural}/{name or ''}"))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        key = (namespace, plural, name or (body or {}).get("metadata", {}).get("name"))
        if self.command == "GET" and key not in self.server.objects:
            return self._reply(404, {"kind": "Status", "message": f'{plural} "{key[2]}" not found', "code": 404})
        if self.command == "POST" and key in self.server.objects:
            return self._reply(409, {"kind": "Status", "message": f'{plural} "{key[2]}" already exists', "code": 409})
        if self.command in ("POST", "PUT"):
            self.server.objects[key] = {**body, "metadata": {**body["metadata"], "resourceVersion": "7"}}
        self._reply({"GET": 200, "POST": 201, "PUT": 200}[self.command], self.server.objects[key])

    do_GET = do_POST = do_PUT = _handle


@pytest.fixture
def api_server():
    server = FakeApiServer()
    yield server
    server.shutdown()


def test_submit_creates_the_runtime_then_the_trainjob_and_refuses_a_second(capsys, api_server, tmp_path):
    kubeconfig = str(api_server.kubeconfig(tmp_path / "kubeconfig"))
    runtime, job, _ = rendered(capsys, *TWO_BY_EIGHT)
    assert main(["submit", *TWO_BY_EIGHT, "--kubeconfig", kubeconfig]) == 0, capsys.readouterr().err
    assert "submitted trainjob team/googlenet-imagenet-bn: 2 nodes x 8 processes" in capsys.readouterr().out
    name = "googlenet-imagenet-bn"
    assert api_server.requests == [("GET", f"trainjobs/{name}"), ("POST", "trainingruntimes/"), ("POST", "trainjobs/")]
    stored = {plural: {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}}
              for (namespace, plural, _), obj in api_server.objects.items() if namespace == "team"}
    assert stored == {"trainingruntimes": runtime, "trainjobs": job}  # the kubeconfig context's namespace

    assert main(["submit", *TWO_BY_EIGHT, "--kubeconfig", kubeconfig]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: trainjob team/{name} exists"), err

    # The TrainJob deleted (finished, or deleted to change it): ours is replaced, the job created again.
    del api_server.objects[("team", "trainjobs", name)]
    api_server.requests.clear()
    assert main(["submit", *TWO_BY_EIGHT, "--max-restarts", "5", "--kubeconfig", kubeconfig]) == 0
    assert [r for r, _ in api_server.requests] == ["GET", "POST", "GET", "PUT", "POST"]
    assert api_server.objects[("team", "trainingruntimes", name)]["spec"]["template"]["spec"][
        "failurePolicy"]["maxRestarts"] == 5


def test_submit_to_an_unreachable_api_server_gives_one_line(capsys, tmp_path):
    server = FakeApiServer()
    kubeconfig = str(server.kubeconfig(tmp_path / "kubeconfig"))
    server.shutdown()
    server.server_close()
    assert main(["submit", *TWO_BY_EIGHT, "--kubeconfig", kubeconfig]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot reach the Kubernetes API at "
                                                         f"http://127.0.0.1:{server.server_address[1]} for team/"), err
    assert "Connection refused" in err


# --- the container's contract, run for real ------------------------------------------------

# 2 nodes x 1 CPU process, 2 epochs of 12 updates, a checkpoint every 4; a signal is acted on
# within 4 updates.
CONTRACT = [*TINY, "schedule.epochs=2", "ema.enabled=true", "train.checkpoint_every_steps=4",
            "train.preemption_poll_steps=2", "train.log_every_steps=1"]


def start_pods(trainer: dict, port: int, logs: Path) -> list[subprocess.Popen]:
    """The trainer container of each node, as the kubelet starts it: the manifest's command and
    arguments, its environment plus the PET_* variables the runtime injects (the master is pod 0,
    here 127.0.0.1), and nothing else but PATH (the image's, whose torchrun is the project's) and HOME.
    Each pod has a core of its own, as it would have its node's: two pods that each took both
    cores of this host for their threads trained 30 times slower (every step waits for the slower)."""
    cores = sorted(os.sched_getaffinity(0))
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
           "HOME": str(logs), **{e["name"]: e["value"] for e in trainer["env"]},
           "PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    pods = []
    for rank in range(trainer["numNodes"]):
        with open(logs / f"pod-{rank}.log", "a") as log:
            pods.append(subprocess.Popen(trainer["command"] + trainer["args"], env={**env, "PET_NODE_RANK": str(rank)},
                                         cwd="/", stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=lambda core=cores[rank % len(cores)]: os.sched_setaffinity(0, {core})))
    return pods


def finish(pods: list[subprocess.Popen], logs: Path) -> tuple[list[int], str]:
    try:
        codes = [pod.wait(timeout=900) for pod in pods]
    finally:  # after a failure, nothing is left training into the next test
        for pod in pods:
            if pod.poll() is None:
                for process in [*psutil.Process(pod.pid).children(recursive=True), pod]:
                    process.kill()
    return codes, (logs / "pod-0.log").read_text()


@pytest.mark.slow
def test_two_pods_train_stop_on_sigterm_with_a_checkpoint_and_resume_to_the_same_weights(capsys, tiny_data, tmp_path):
    runs = tmp_path / "runs"
    trainers = {}
    for name in ("straight", "preempted"):
        _, job, _ = rendered(capsys, "--config", "configs/default.yaml", "--nodes", "2", "--gpus-per-node", "0",
                             "--image", "local", "--workdir", str(ROOT), "--volume", f"data={tiny_data}",
                             "--volume", f"runs={runs}", "--data", str(tiny_data), "--output", str(runs),
                             *CONTRACT, f"name={name}")
        trainers[name] = job["spec"]["trainer"]
        (tmp_path / name).mkdir()
    started = time.monotonic()
    straight = start_pods(trainers["straight"], free_port(), tmp_path / "straight")
    preempted = start_pods(trainers["preempted"], free_port(), tmp_path / "preempted")
    run_dir = runs / "preempted"
    try:
        wait_for(lambda: 4 in steps_saved(run_dir) or any(p.poll() is not None for p in preempted), timeout=900,
                 what="checkpoint 4")
        # exec: the pod's main process is the launcher itself, which the kubelet's SIGTERM reaches
        assert all("torchrun" in " ".join(psutil.Process(p.pid).cmdline()) for p in preempted)
        for pod in preempted:
            pod.send_signal(signal.SIGTERM)
    finally:
        codes, log = finish(preempted, tmp_path / "preempted")
    stopped = re.search(r"stopped at step (\d+) on SIGTERM, checkpoint written", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert codes == [1, 1]  # failed pods: the pod failure policy then applies
    assert 4 <= step < 24 and steps_saved(run_dir)[-1] == step and not (run_dir / "run.lock").exists()

    codes, log = finish(straight, tmp_path / "straight")
    assert codes == [0, 0], log[-4000:]
    assert "2 processes on cpu" in log and "parameters identical on all 2 processes" in log  # one gloo job

    codes, log = finish(start_pods(trainers["preempted"], free_port(), tmp_path / "preempted"), tmp_path / "preempted")
    assert codes == [0, 0], log[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}'}" in log
    same_weights(runs / "straight", run_dir)
    assert [s for s, _ in scalars(run_dir)["train/loss"]] == list(range(1, 25))  # no step lost or twice
    print(f"\ncontract: stopped at step {step}, resumed; {time.monotonic() - started:.0f} s", file=sys.stderr)
