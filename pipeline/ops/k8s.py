"""Submit training to Kubernetes as a Kubeflow Trainer TrainJob (``trainer.kubeflow.org/v1alpha1``).

    python -m pipeline.ops.k8s render --config configs/NAME.yaml --nodes N --gpus-per-node G --image IMAGE \\
        --volume CLAIM=/MOUNT --output /MOUNT/runs [--data DIR-or-URL] [--out FILE] [...] [key=value ...]
    python -m pipeline.ops.k8s submit (the same options) [--namespace NS] [--kubeconfig FILE] [--context CONTEXT]

Two objects, one YAML stream: a namespaced TrainingRuntime, the torch runtime with what a
TrainJob cannot carry (the JobSet's failure policy, the Job's pod failure policy and back-off
limit; with them the pods' grace period and volumes), and the TrainJob that names it (image,
entry command, nodes, processes per node, GPUs). ``render`` prints them (or writes ``--out``); ``submit``
creates them through the Kubernetes Python client. docs/kubernetes.md shows a rendered pair.

The container runs ``exec torchrun`` with the rendezvous the runtime injects (``PET_*``), so
that the pod's SIGTERM reaches the launcher, which forwards it to the training processes: they
checkpoint at an agreed step and stop (pipeline/ops/preemption.py). The run directory is on a
volume every pod mounts, and ``name``/``output_dir`` are pinned in the arguments, so a restarted
job resumes from it exactly.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from pipeline.config import Config, ConfigError, load_config, recipe_path
from shards.store import is_remote

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"  # marks the replicated job the TrainJob's trainer fills
PET_VARIABLES = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
GPU_RESOURCE = "nvidia.com/gpu"
# The JobSet names pods' hosts NAME-node-0-INDEX (a DNS label of at most 63 characters).
JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
EXIT_MARGIN_S = 30  # after the checkpoint: loader workers stopped, trackers flushed, processes gone


def entry_script(workdir: str) -> str:
    """The container's command (``bash -c``; the trainer's arguments follow as ``$@``). ``exec``:
    torchrun becomes the container's main process, which the kubelet signals; it installs a
    SIGTERM handler (so it is signalled even as PID 1) and forwards the signal to its workers."""
    return (f"set -euo pipefail\n"
            f"cd {shlex.quote(workdir)}\n"
            f'exec torchrun --nnodes "$PET_NNODES" --nproc_per_node "$PET_NPROC_PER_NODE" '
            f'--node_rank "$PET_NODE_RANK" \\\n'
            f'  --master_addr "$PET_MASTER_ADDR" --master_port "$PET_MASTER_PORT" train.py "$@"\n')


@dataclass(frozen=True)
class Volume:
    claim: str
    mount: str

    @property
    def name(self) -> str:  # a pod volume's name is a DNS label; a claim's may hold dots
        return self.claim.replace(".", "-")[:63]

    def holds(self, path: str) -> bool:
        return PurePosixPath(path).is_relative_to(self.mount)


@dataclass(frozen=True)
class CheckpointEstimate:
    """How long the grace period must be, from the recipe's model size."""
    parameters: int
    bytes_per_parameter: int
    what: str  # what those bytes are
    write_mb_per_s: float
    stop_allowance_s: float

    @property
    def checkpoint_bytes(self) -> int:
        return self.parameters * self.bytes_per_parameter

    @property
    def write_s(self) -> float:
        return self.checkpoint_bytes / (self.write_mb_per_s * 1e6)

    @property
    def grace_s(self) -> int:
        return math.ceil(self.stop_allowance_s + self.write_s + EXIT_MARGIN_S)

    def lines(self) -> list[str]:
        return [f"Grace period {self.grace_s} s = {self.stop_allowance_s:g} s to reach the step all processes stop at "
                f"(--stop-allowance-s)",
                f"  + {self.write_s:.1f} s to write the checkpoint: {self.parameters:,} parameters x "
                f"{self.bytes_per_parameter} bytes ({self.what}) = {self.checkpoint_bytes / 1e6:,.0f} MB "
                f"at {self.write_mb_per_s:g} MB/s (--write-mb-per-s)",
                f"  + {EXIT_MARGIN_S} s for the processes to exit."]


def estimate_checkpoint(config: Config, num_classes: int, write_mb_per_s: float,
                        stop_allowance_s: float) -> CheckpointEstimate:
    """The checkpoint rank 0 writes: float32 weights (also under bf16/fp16 autocast), SGD's
    momentum buffer and the EMA's copy; the model is built on the meta device (no memory)."""
    import torch

    from pipeline.models import build_model

    with torch.device("meta"):
        model = build_model(config.model.name, num_classes, config.model.aux_logits, config.model.dropout)
    parameters = sum(p.numel() for p in model.parameters())
    parts = ["weights"] + (["momentum"] if config.optim.momentum else []) + (["EMA"] if config.ema.enabled else [])
    return CheckpointEstimate(parameters, 4 * len(parts), ", ".join(parts) + ", float32",
                              write_mb_per_s, stop_allowance_s)


@dataclass(frozen=True)
class Job:
    name: str
    namespace: str | None
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    image: str
    workdir: str
    volumes: tuple[Volume, ...]
    arguments: tuple[str, ...]  # the trainer's: --config, overrides, then the pinned name, output_dir, data.dir
    env: tuple[dict, ...]
    cpus_per_node: str | None
    memory_per_node: str | None
    service_account: str | None
    max_restarts: int
    checkpoint: CheckpointEstimate


def metadata(job: Job) -> dict:
    meta = {"name": job.name}
    if job.namespace:
        meta["namespace"] = job.namespace
    meta["labels"] = {"app.kubernetes.io/name": "googlenet", "app.kubernetes.io/instance": job.name}
    return meta


def training_runtime(job: Job) -> dict:
    container = {"name": "node", "image": job.image,
                 "volumeMounts": [{"name": v.name, "mountPath": v.mount} for v in job.volumes]
                 + [{"name": "dshm", "mountPath": "/dev/shm"}]}
    pod = {"restartPolicy": "Never",  # a pod failure policy needs it; a failed pod is the Job's to replace
           "terminationGracePeriodSeconds": job.checkpoint.grace_s,
           "containers": [container],
           "volumes": [{"name": v.name, "persistentVolumeClaim": {"claimName": v.claim}} for v in job.volumes]
           # loader workers pass batches through shared memory; a container's /dev/shm is 64 MB
           + [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
    if job.service_account:
        pod["serviceAccountName"] = job.service_account
    node_job = {
        # A preempted pod stops the others (they agree on the stop step) and they exit non-zero
        # too, without a DisruptionTarget condition: up to nodes-1 such failures must not fail
        # the Job before the disrupted pod's own failure does, by the rule below.
        "backoffLimit": job.nodes - 1,
        "podFailurePolicy": {"rules": [{"action": "FailJob",
                                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
        "template": {"spec": pod},
    }
    return {
        "apiVersion": API_VERSION, "kind": "TrainingRuntime", "metadata": metadata(job),
        "spec": {
            "mlPolicy": {"numNodes": job.nodes, "torch": {}},
            "template": {"spec": {
                "failurePolicy": {
                    "maxRestarts": job.max_restarts,  # for real failures
                    # every old pod is gone (its checkpoint written) before the new ones start
                    "restartStrategy": "BlockingRecreate",
                    "rules": [{"name": "restartAfterDisruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
                               "onJobFailureReasons": ["PodFailurePolicy"]}],
                },
                "replicatedJobs": [{"name": "node", "replicas": 1,
                                    "template": {"metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                                                 "spec": node_job}}],
            }},
        },
    }


def train_job(job: Job) -> dict:
    resources: dict = {}
    if job.gpus_per_node:
        resources["limits"] = {GPU_RESOURCE: str(job.gpus_per_node)}
    requests = {k: v for k, v in (("cpu", job.cpus_per_node), ("memory", job.memory_per_node)) if v}
    if requests:
        resources["requests"] = requests
    trainer = {"image": job.image, "command": ["/bin/bash", "-c", entry_script(job.workdir), "train"],
               "args": list(job.arguments), "env": list(job.env),
               "numNodes": job.nodes, "numProcPerNode": job.procs_per_node}
    if resources:
        trainer["resourcesPerNode"] = resources
    return {"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": metadata(job),
            "spec": {"runtimeRef": {"apiGroup": GROUP, "kind": "TrainingRuntime", "name": job.name},
                     "trainer": trainer}}


def manifests(job: Job) -> list[dict]:
    return [training_runtime(job), train_job(job)]


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def to_yaml(docs: list[dict], header: list[str]) -> str:
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header)
    return comments + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120, explicit_start=True)


def api_problems(docs: list[dict]) -> list[str]:
    """What the Trainer API's own models (kubeflow_trainer_api) would not carry, one line each:
    a value they refuse, or a field they drop (a misspelled or unknown one: the models ignore
    unknown fields, so every field given must come back from their round trip)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainingRuntime, TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    models = {"TrainJob": TrainerV1alpha1TrainJob, "TrainingRuntime": TrainerV1alpha1TrainingRuntime}
    problems = []
    for doc in docs:
        kind = doc.get("kind")
        if kind not in models or doc.get("apiVersion") != API_VERSION:
            problems.append(f"{kind}: not a {API_VERSION} TrainJob or TrainingRuntime")
            continue
        try:
            back = models[kind].from_dict(doc).to_dict()
        except ValidationError as exc:
            error = exc.errors()[0]
            problems.append(f"{kind}: {'.'.join(map(str, error['loc']))}: {error['msg']}")
            continue
        problems += [f"{kind}: {path}" for path in _dropped(doc, back, "")]
    return problems


def _dropped(given, back, path: str) -> list[str]:
    """Paths in ``given`` whose value did not come back."""
    if isinstance(given, dict):
        if not isinstance(back, dict):
            return [f"{path}: became {back!r}"]
        return [p for key, value in given.items()
                for p in (_dropped(value, back[key], f"{path}.{key}".lstrip(".")) if key in back
                          else [f"{path}.{key}".lstrip(".") + ": unknown field"])]
    if isinstance(given, list):
        if not isinstance(back, list) or len(back) != len(given):
            return [f"{path}: became {back!r}"]
        return [p for i, (a, b) in enumerate(zip(given, back)) for p in _dropped(a, b, f"{path}[{i}]")]
    return [] if given == back else [f"{path}: {given!r} became {back!r}"]


def _pairs(values: list[str], option: str, separator: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        left, sep, right = value.partition(separator)
        if not (sep and left and right):
            raise ConfigError(f"{option} {value!r}: expected LEFT{separator}RIGHT")
        pairs.append((left, right))
    return pairs


def _environment(args) -> tuple[dict, ...]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # log lines reach `kubectl logs` as they are written
    for name, value in _pairs(args.env, "--env", "="):
        env.append({"name": name, "value": value})
    for name, ref in _pairs(args.secret_env, "--secret-env", "="):
        secret, _, key = ref.partition(":")
        if not (secret and key):
            raise ConfigError(f"--secret-env {name}={ref}: expected NAME=SECRET:KEY")
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    for item in env:
        if item["name"].startswith("PET_") or item["name"] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT":
            option = "--secret-env" if "valueFrom" in item else "--env"
            raise ConfigError(f"{option} {item['name']}: set by the runtime or by this command; leave it out")
    return tuple(env)


def _under_volume(path: str, volumes: list[Volume], what: str) -> None:
    if not PurePosixPath(path).is_absolute():
        raise ConfigError(f"{what} {path}: an absolute path in the container, on a volume (--volume CLAIM=/MOUNT)")
    if not any(v.holds(path) for v in volumes):
        mounts = ", ".join(v.mount for v in volumes) or "none"
        raise ConfigError(f"{what} {path}: on no mounted volume (mounted: {mounts}); add --volume CLAIM=/MOUNT")


def job_from_args(args) -> Job:
    """The job the options describe, every option checked: ConfigError with one line if not."""
    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes}: at least 1")
    allowed = [n for n in (1, 2, 4, 8, 16) if n <= args.max_gpus_per_node]
    if not allowed:
        raise ConfigError(f"--max-gpus-per-node {args.max_gpus_per_node}: at least 1")
    if args.gpus_per_node and args.gpus_per_node not in allowed:
        raise ConfigError(f"--gpus-per-node {args.gpus_per_node}: a node has {', '.join(map(str, allowed))} GPUs "
                          f"(--max-gpus-per-node {args.max_gpus_per_node}), or 0 for CPU-only nodes")
    if args.procs_per_node is not None and (args.gpus_per_node or args.procs_per_node < 1):
        raise ConfigError(f"--procs-per-node {args.procs_per_node}: for CPU-only nodes (--gpus-per-node 0), "
                          f"at least 1; on GPU nodes it is one process per GPU")
    if not args.image or any(c.isspace() for c in args.image):
        given = f" {args.image!r}" if args.image else ""
        raise ConfigError(f"--image{given}: required, the container image that holds this repository at --workdir "
                          f"and its dependencies (docs/kubernetes.md#the-image)")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts}: 0 or more")
    if args.write_mb_per_s <= 0:
        raise ConfigError(f"--write-mb-per-s {args.write_mb_per_s:g}: more than 0")
    if args.stop_allowance_s < 0:
        raise ConfigError(f"--stop-allowance-s {args.stop_allowance_s:g}: 0 or more")
    if args.num_classes < 1:
        raise ConfigError(f"--num-classes {args.num_classes}: at least 1")
    recipe = recipe_path(args.config)
    try:
        in_image = recipe.resolve().relative_to(REPO).as_posix()
    except ValueError:
        raise ConfigError(f"--config {args.config}: outside this repository, so not in the image; "
                          f"put it under configs/ and build the image again") from None
    config = load_config(recipe, args.overrides)  # a bad recipe or override fails here, not in the cluster
    volumes = []
    for claim, mount in _pairs(args.volume, "--volume", "="):
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", claim) or not mount.startswith("/"):
            raise ConfigError(f"--volume {claim}={mount}: expected CLAIM=/MOUNT (a claim name, an absolute path)")
        volumes.append(Volume(claim, mount.rstrip("/") or "/"))
    if not args.output:
        raise ConfigError("--output: required, a directory on a volume every pod mounts (--volume CLAIM=/MOUNT), "
                          "where the run directory outlives the pods")
    if is_remote(args.output):
        raise ConfigError(f"--output {args.output}: the trainer writes its run directory (the checkpoints it resumes "
                          f"from) to a file system; give a directory on a ReadWriteMany volume (--volume CLAIM=/MOUNT)")
    _under_volume(args.output, volumes, "--output")
    data = args.data if args.data is not None else config.data.dir
    if data is not None and not is_remote(data):
        _under_volume(data, volumes, "--data" if args.data is not None else "data.dir (the recipe's)")
    name = args.job_name or "googlenet-" + re.sub(r"[^a-z0-9]+", "-", config.name.lower()).strip("-")
    if not JOB_NAME.fullmatch(name):
        raise ConfigError(f"--job-name {name}: 1 to 40 characters, a-z, 0-9 and '-', starting with a letter "
                          f"(an RFC 1035 label with room for the pods' host names)")
    # Pinned, whatever the recipe in the image says: a restart must find the same run directory.
    arguments = ["--config", in_image, *args.overrides, f"name={config.name}", f"output_dir={args.output}"]
    if data is not None:
        arguments.append(f"data.dir={data}")
    procs = args.gpus_per_node or args.procs_per_node or 1
    estimate = estimate_checkpoint(config, args.num_classes, args.write_mb_per_s, args.stop_allowance_s)
    # torchrun waits this long for its workers after a SIGTERM before killing them (30 s unless told)
    env = (*_environment(args), {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(max(estimate.grace_s - 5, 1))})
    return Job(name=name, namespace=args.namespace, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
               procs_per_node=procs, image=args.image, workdir=args.workdir, volumes=tuple(volumes),
               arguments=tuple(arguments), env=env, cpus_per_node=args.cpus_per_node,
               memory_per_node=args.memory_per_node, service_account=args.service_account,
               max_restarts=args.max_restarts, checkpoint=estimate)


def render_job(job: Job, command_line: list[str]) -> tuple[list[dict], str]:
    docs = manifests(job)
    try:
        problems = api_problems(docs)
    except ImportError:  # the k8s extra is not installed: the manifests are not checked here
        problems = []
    if problems:
        raise RuntimeError("the manifests do not fit the Trainer API: " + "; ".join(problems))
    where = "GPU" if job.gpus_per_node else "CPU process"
    header = [f"{job.name}: {job.nodes} nodes x {job.procs_per_node} {where}s, Kubeflow Trainer {API_VERSION}",
              "rendered by: python -m pipeline.ops.k8s " + shlex.join(command_line), *job.checkpoint.lines()]
    return docs, to_yaml(docs, header)


def current_namespace(kubeconfig: str | None, context: str | None) -> str:
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except config.ConfigException:  # no kubeconfig: inside a pod, its own namespace
        path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return path.read_text().strip() if path.is_file() else "default"
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    return (chosen or {}).get("context", {}).get("namespace") or "default"


def submit(docs: list[dict], namespace: str, kubeconfig: str | None, context: str | None) -> None:
    """Create the runtime (or replace ours, left by an earlier submission) and the TrainJob."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
    except config.ConfigException:
        config.load_incluster_config()
        api_client = client.ApiClient()
    api = client.CustomObjectsApi(api_client)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retries: the one line below says it
    runtime, job = docs
    name = job["metadata"]["name"]
    where = f"{namespace}/{name}"
    try:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainjobs", name)
            raise RuntimeError(f"trainjob {where} exists (running or finished); delete it first "
                               f"(kubectl delete trainjob -n {namespace} {name}): the new one resumes from "
                               f"the run directory")
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingruntimes", runtime)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainingruntimes", name)
            runtime = {**runtime, "metadata": {**runtime["metadata"],
                                               "resourceVersion": current["metadata"]["resourceVersion"]}}
            api.replace_namespaced_custom_object(GROUP, VERSION, namespace, "trainingruntimes", name, runtime)
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainjobs", job)
    except ApiException as exc:
        reason = (exc.reason or "").strip() or "error"
        raise RuntimeError(f"the Kubernetes API answered {exc.status} {reason} for {where}: "
                           f"{_api_message(exc.body)}") from None
    except HTTPError as exc:  # the client gave up connecting (urllib3 retried)
        reason = str(getattr(exc, "reason", None) or exc).split(": ", 1)[-1]
        raise RuntimeError(f"cannot reach the Kubernetes API at {api_client.configuration.host} for {where}: "
                           f"{reason}") from None


def _api_message(body) -> str:
    import json

    try:
        return json.loads(body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(body or "").strip().splitlines()[0] if body else "no message"


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/default.yaml", help="the recipe, inside this repository")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="1, 2, 4 or 8; 0: CPU-only nodes (gloo)")
    parser.add_argument("--max-gpus-per-node", type=int, default=8, help="the most GPUs the cluster's nodes have")
    parser.add_argument("--procs-per-node", type=int, help="CPU-only nodes: training processes per node (default 1)")
    parser.add_argument("--image", help="the container image: this repository at --workdir, its dependencies")
    parser.add_argument("--workdir", default="/workspace/googlenet", help="where the image holds this repository")
    parser.add_argument("--volume", action="append", default=[], metavar="CLAIM=/MOUNT",
                        help="mount a PersistentVolumeClaim on every pod (repeatable)")
    parser.add_argument("--data", help="data.dir: a directory on a --volume, or s3://, gs://, https:// "
                        "(default: the recipe's)")
    parser.add_argument("--output", help="output_dir: a directory on a ReadWriteMany --volume")
    parser.add_argument("--job-name", help="the TrainJob's name (default: googlenet-NAME)")
    parser.add_argument("--namespace", help="render: put it in the manifests; submit: default the kubeconfig's")
    parser.add_argument("--cpus-per-node", help="CPU request per node, e.g. 64")
    parser.add_argument("--memory-per-node", help="memory request per node, e.g. 480Gi")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="repeatable")
    parser.add_argument("--secret-env", action="append", default=[], metavar="NAME=SECRET:KEY",
                        help="a variable from a Secret (object store credentials), repeatable")
    parser.add_argument("--service-account", help="the pods' service account (e.g. for workload identity)")
    parser.add_argument("--max-restarts", type=int, default=3, help="restarts after failures; "
                        "restarts after a disruption (preemption, eviction) are not counted")
    parser.add_argument("--num-classes", type=int, default=1000, help="for the checkpoint's size (default 1000)")
    parser.add_argument("--write-mb-per-s", type=float, default=100.0,
                        help="assumed write rate of the run directory's volume (default 100 MB/s)")
    parser.add_argument("--stop-allowance-s", type=float, default=60.0,
                        help="time to reach the step every process stops at (default 60 s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ops.k8s", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print the TrainingRuntime and the TrainJob as YAML")
    _options(render)
    render.add_argument("--out", help="write the YAML to this file instead of printing it")
    apply = sub.add_parser("submit", help="create them in the cluster (the kubeconfig's, or in-cluster)")
    _options(apply)
    apply.add_argument("--kubeconfig", help="the kubeconfig file (default: $KUBECONFIG, ~/.kube/config; "
                       "in a pod, its service account)")
    apply.add_argument("--context", help="the kubeconfig context (default: the current one)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        job = job_from_args(args)
        docs, text = render_job(job, argv)
        if args.command == "render":
            if args.out:
                Path(args.out).write_text(text)
                print(f"wrote {args.out}: {', '.join(d['kind'] + ' ' + job.name for d in docs)}")
            else:
                sys.stdout.write(text)
            return 0
        namespace = args.namespace or current_namespace(args.kubeconfig, args.context)
        submit(docs, namespace, args.kubeconfig, args.context)
        print(f"submitted trainjob {namespace}/{job.name}: {job.nodes} nodes x {job.procs_per_node} processes")
        print(f"kubectl get trainjob -n {namespace} {job.name}; "
              f"kubectl logs -n {namespace} -f -l jobset.sigs.k8s.io/jobset-name={job.name}")
        return 0
    except (ConfigError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
