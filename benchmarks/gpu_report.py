"""Every GPU figure of the project in one command: each benchmark as a subprocess with its own
time cap, then ``DIR/report.md`` (the steps, their key figures, the targets met or not, the
plots), whose tables it also prints.

    python -m benchmarks.gpu_report --out DIR [--cifar PATH] [--smoke] [--steps NAME ...] [--cap NAME=SECONDS ...]

The steps, in this order, with their caps on a GPU (895 s in all):
- ``data`` (90 s): CIFAR-10, the loader's JPEGs and the end-to-end runs' shards (10,240
  synthetic JPEGs), prepared by ``benchmarks/gpu_report_data.py``;
- ``bench_train`` (255 s): ``benchmarks/bench_train.py``'s table: torchvision's reference,
  ``googlenet_bn`` bf16 compiled, the paper's ``googlenet``, and end to end with validation
  (the shard loader on those shards, 3 epochs, a throughput point every 10 updates for the epoch starts);
- ``dali_loader`` (30 s): ``bench_loader.py --dali-only --dali-variants --loaders-only``: the DALI
  loader alone (224 px, every core a worker and a thread), hardware decoder load 0 and 1, each
  crop's region decoded or the whole image, and the device memory its pipeline holds;
- ``dali_end_to_end`` (100 s): ``bench_train``'s end-to-end run again with ``data.loader=dali``
  (the same shards, configuration and rate), against the shard loader's and the device-resident rate;
- ``cuda_tests`` (75 s): ``python -m pytest -m cuda``, the tests that skip without CUDA;
- ``loader`` (30 s): ``benchmarks/bench_loader.py`` with every core as a worker;
- ``cifar10`` (170 s, then 30 s for the report): ``accelerate launch train.py --config
  configs/cifar10.yaml``, then ``python -m pipeline.train.report`` on the run: time to 94%, or
  where it stands at the cap, and the time-to-accuracy plot ``DIR/cifar10.png``;
- ``seed_recipe`` (85 s): ``benchmarks/seed_recipe.py`` for one minute: its img/s and accuracy;
- ``loader_restart`` (30 s): ``loader`` with restart markers.

Without ``--steps`` the run keeps to a budget of 420 s (``--budget``): a step starts only if its
cap fits in what is left, so a 15-minute lease has room for a second run; the report ends with
the command that measures the steps left out.

A step that outlives its cap is killed with its process group and recorded as "timed out at N
s"; a failing one with the end of its stderr; the report goes on either way, and report.md is
rewritten after every step (the processes' output is in DIR/logs). ``--steps`` runs some steps
only (``data`` too when they need it); ``--cap bench_train=400`` changes a cap.
``--smoke``: the same steps at tiny sizes on the CPU, on synthetic data; its caps (900 s each)
are only a safety net.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPS = {"data": 90, "bench_train": 255, "cifar10": 170, "cifar10_report": 30, "seed_recipe": 85, "loader": 30,
        "loader_restart": 30, "dali_loader": 30, "dali_end_to_end": 100, "cuda_tests": 75}
SMOKE_CAP = 900  # a safety net only: a loaded 2-core machine can take minutes for a tiny step
# In order of what a short lease should measure first: the training rates and the DALI loader, whose
# targets nothing else can settle, before the figures that older CPU-node runs already bound.
STEPS = ("data", "bench_train", "dali_loader", "dali_end_to_end", "cuda_tests", "loader", "cifar10", "seed_recipe",
         "loader_restart")
# Seconds of the default run: a step starts only if its cap fits in what is left, so the run ends
# in 7 minutes and a 15-minute lease (start-up included) has room to run it again.
DEFAULT_BUDGET = 420
NEEDS_DATA = {"bench_train", "cifar10", "seed_recipe", "loader", "loader_restart", "dali_loader", "dali_end_to_end"}
SEED_MINUTE = 60  # seconds of the seeds' recipe
TEN_MINUTES = 600  # the CIFAR-10 target's time
NO_DIP = 0.9  # an epoch's first log window at least this share of the median window: no dip at epoch starts
LOADER_RATE = 12000  # img/s: the DALI loader alone must outrun googlenet_bn's target rate
DALI_MEMORY_GIB = 4.0  # the device memory the DALI pipeline may hold: 5% of an H100's 80 GB
SMOKE_CIFAR = ["data.image_size=32", "data.eval_resize=32", "data.batch_size=16", "data.workers=1",
               "data.shuffle_buffer=16", "schedule.epochs=2", "schedule.warmup_epochs=1", "train.log_every_steps=2",
               "train.image_grid=false",
               "model.compile_backend=aot_eager"]  # the recipe compiles; inductor would take minutes on a CPU


@dataclass
class Target:
    what: str
    measured: str = "not measured"
    met: bool | None = None  # None: not measured, or not decided within the cap

    def verdict(self) -> str:
        return {True: "met", False: "not met"}.get(self.met, "-" if self.measured == "not measured" else "open")


@dataclass
class Outcome:
    step: str
    status: str = "not run"
    figures: str = ""
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)  # markdown for the report's section of this step


@dataclass
class Ran:
    returncode: int | None  # None: killed at the cap
    cap: float
    seconds: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def status(self) -> str:
        if self.returncode is None:
            return f"timed out at {self.cap:g} s"
        return "ok" if self.ok else f"failed (exit {self.returncode})"

    def tail(self, lines: int = 15) -> str:
        """The last lines of stderr (of stdout where stderr is empty: pytest), progress bars folded."""
        text = self.stderr if self.stderr.strip() else self.stdout
        found = text.strip().splitlines()
        if found and found[-1].startswith("subprocess.CalledProcessError"):  # accelerate launch on its child's exit
            found = found[:max(i for i, line in enumerate(found) if line.startswith("Traceback"))]
            while found and (not found[-1].strip() or found[-1].startswith("The above exception")):
                found.pop()
        return "\n".join(line.rsplit("\r", 1)[-1] for line in found[-lines:])


class Report:
    def __init__(self, args):
        self.args, self.out = args, args.out.resolve()
        self.caps = {name: SMOKE_CAP if args.smoke else cap for name, cap in CAPS.items()} | args.cap
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                                 "PYTHONUNBUFFERED": "1"}
        self.cores = len(os.sched_getaffinity(0))
        self.data: dict | None = None
        self.outcomes = {name: Outcome(name) for name in STEPS}
        self.targets = {key: Target(what) for key, what in (
            ("bn_rate", "`googlenet_bn` >= 12,000 img/s"), ("bn_ratio", "`googlenet_bn` >= 2x the torchvision reference"),
            ("paper_rate", "the paper's `googlenet` >= 8,000 img/s"),
            ("end_to_end", "end to end >= 85% of the device-resident rate"),
            ("dip", f"no dip at epoch starts (end to end: every first log window >= {NO_DIP:.0%} of the median)"),
            ("cifar", "CIFAR-10 >= 94% top-1 in <= 10 min"),
            ("dali_load0", f"DALI loader alone (224 px, hw decoder load 0, region decoding) >= {LOADER_RATE:,} img/s"),
            ("dali_load1", f"DALI loader alone with hw decoder load 1 (region decoding) >= {LOADER_RATE:,} img/s"),
            ("dali_region", "DALI region decoding at least as fast as whole-image decoding (the faster load)"),
            ("dali_memory", f"DALI pipeline's device memory <= {DALI_MEMORY_GIB:g} GiB"),
            ("dali_end_to_end", "DALI end to end (`data.loader=dali`) >= 85% of the device-resident rate"),
            ("dali_vs_shards", "DALI end to end at least as fast as the shard loader's end to end"),
            ("dali_dip", f"DALI no dip at epoch starts (every first log window >= {NO_DIP:.0%} of the median)"))}
        self.rest = ""  # the command that runs the steps the budget left out
        self.bench_rows: dict | None = None  # bench_train.json's rows by name, for the DALI end-to-end step
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.torch_version, self.device = "?", "?"

    def run(self, name: str, command: list[str], cap: float, env: dict | None = None) -> Ran:
        """``command`` in a process group of its own, killed whole at ``cap`` seconds."""
        print(f"[gpu_report] {name}: {shlex.join(command)} (cap {cap:g} s)", file=sys.stderr, flush=True)
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        started = time.perf_counter()
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr, env=env or self.env,
                                       start_new_session=True)
            try:
                returncode = process.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:  # also after a normal exit: no stray worker may run into the next step's figures
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        ran = Ran(returncode, cap, time.perf_counter() - started, out.read_text(errors="replace"),
                  err.read_text(errors="replace"))
        print(f"[gpu_report] {name}: {ran.status()} after {ran.seconds:.0f} s", file=sys.stderr, flush=True)
        return ran

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # ------------------------------------------------------------------------------------- steps
    def query_device(self) -> None:
        ran = self.run("device", self.python("-c", "import torch; print(torch.__version__); print("
                                             "torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"),
                       60)
        if ran.ok:
            self.torch_version, self.device = ran.stdout.split()[0], " ".join(ran.stdout.split("\n")[1].split())

    def step_data(self, o: Outcome) -> None:
        command = self.python("-m", "benchmarks.gpu_report_data", "--out", str(self.out / "data"))
        command += ["--smoke"] * self.args.smoke + (["--cifar", str(self.args.cifar.resolve())] if self.args.cifar else [])
        ran = self.finish(o, self.run("data", command, self.caps["data"]))
        if ran.ok:
            self.data = json.loads((self.out / "data" / "data.json").read_text())
            o.figures = self.data["summary"]

    def step_bench_train(self, o: Outcome) -> None:
        keep = self.out / "runs" / "bench_train"
        shutil.rmtree(keep, ignore_errors=True)  # a new measurement, not a resumed run
        json_path = self.out / "bench_train.json"
        json_path.unlink(missing_ok=True)
        sizes = ["--smoke", "--epochs", "2", "--log-every", "2"] if self.args.smoke else [
            "--synthetic-per-class", "1024", "--epochs", "3", "--log-every", "10"]  # 40 updates an epoch: 4 windows
        if self.data:  # the shards the DALI end-to-end run reads too
            sizes += ["--shards", self.data["e2e_shards"]]
        ran = self.finish(o, self.run("bench_train", self.python("benchmarks/bench_train.py", *sizes, "--json",
                                                                 str(json_path), "--keep-run", str(keep)),
                                      self.caps["bench_train"]))
        if ran.ok:
            o.details.append(f"```text\n{ran.stdout.strip()}\n```")
        if not json_path.is_file():  # written after the device-resident rows, and again after end to end
            return
        rows = self.bench_rows = {row["name"].split(" (")[0]: row for row in json.loads(json_path.read_text())["rows"]}
        reference, bn, paper = rows["torchvision reference"], rows["googlenet_bn"], rows["googlenet"]  # its names
        end_to_end = rows.get("end to end")
        o.figures = (f"reference {reference['images_per_sec']:,.0f} img/s; googlenet_bn {bn['images_per_sec']:,.0f} "
                     f"({bn['vs_reference']:.2f}x ref); paper {paper['images_per_sec']:,.0f}")
        t = self.targets
        t["bn_rate"].measured, t["bn_rate"].met = f"{bn['images_per_sec']:,.0f} img/s", bn["images_per_sec"] >= 12000
        t["bn_ratio"].measured, t["bn_ratio"].met = f"{bn['vs_reference']:.2f}x", bn["vs_reference"] >= 2
        t["paper_rate"].measured = f"{paper['images_per_sec']:,.0f} img/s"
        t["paper_rate"].met = paper["images_per_sec"] >= 8000
        if end_to_end is not None:
            share = end_to_end["of_device_resident"]
            o.figures += f"; end to end {end_to_end['images_per_sec']:,.0f} ({share:.0%} of device)"
            t["end_to_end"].measured, t["end_to_end"].met = f"{share:.0%}", share >= 0.85
            dip = epoch_start_dip(keep / "bench")
            if dip is not None:
                t["dip"].measured = f"slowest first window {dip:.2f}x the median window"
                t["dip"].met = dip >= NO_DIP
                o.figures += f", epoch starts at {dip:.2f}x"
            else:
                t["dip"].measured = "too few log windows to tell"

    def step_cifar10(self, o: Outcome) -> None:
        shards = self.data and self.data["cifar_shards"]
        if not shards:
            o.status = f"skipped: no CIFAR-10 ({self.data['cifar_from'] if self.data else 'see the data step'})"
            return
        run_dir = self.out / "runs" / "cifar10"
        shutil.rmtree(run_dir, ignore_errors=True)  # a new measurement, not a resumed run
        command = self.python("-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                              "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
                              "--config", "configs/cifar10.yaml", f"data.dir={shards}", "name=cifar10",
                              f"output_dir={self.out / 'runs'}", *SMOKE_CIFAR * self.args.smoke)
        ran = self.finish(o, self.run("cifar10", command, self.caps["cifar10"]))
        if not (run_dir / "metrics.jsonl").is_file():
            return
        plot = self.out / "cifar10.png"
        report = self.run("cifar10_report", self.python("-m", "pipeline.train.report", str(run_dir), "--targets", "90",
                                                        "93", "94", "--plot", str(plot)), self.caps["cifar10_report"])
        o.seconds += report.seconds
        if not report.ok:
            o.status += f"; report {report.status()}"
            o.details.append(f"report:\n\n```text\n{report.tail()}\n```")
            return
        o.details.append(f"```text\n{report.stdout.strip()}\n```\n\n![time to accuracy]({plot.name})")
        from pipeline.train.report import ReportError, format_seconds, summarize

        runs = {"model": summarize(run_dir)}
        try:
            runs["EMA"] = summarize(run_dir, "ema")
        except ReportError:  # the recipe without its EMA
            pass
        model = runs["model"]
        reached = [s for s in (r.seconds_to(94) for r in runs.values()) if s is not None]
        o.figures = (f"{model.final.epoch:g} epochs in {format_seconds(model.train_seconds)}: top-1 "
                     + ", ".join(f"{100 * (1 - r.final.top1_error):.2f}% ({kind})" for kind, r in runs.items())
                     + f"; 94% {'at ' + format_seconds(min(reached)) if reached else 'not reached'}")
        target = self.targets["cifar"]
        best = max(100 * (1 - r.final.top1_error) for r in runs.values())
        if reached:
            target.measured, target.met = f"94% at {format_seconds(min(reached))}", min(reached) <= TEN_MINUTES
        elif ran.returncode is not None or model.train_seconds >= TEN_MINUTES:  # ended, or ran its 10 minutes
            target.measured, target.met = f"{best:.2f}% after {format_seconds(model.train_seconds)}", False
        else:  # stopped by the cap before the 10 minutes were up
            target.measured = f"{best:.2f}% at the cap, after {format_seconds(model.train_seconds)} (of 10 min)"

    def step_seed_recipe(self, o: Outcome) -> None:
        folders = self.data and self.data["cifar_folders"]
        if not folders:
            o.status = "skipped: needs CIFAR-10 as class folders" + (" (given: prepared shards)" if self.data else
                                                                     " (see the data step)")
            return
        out = self.out / "runs" / "seed_recipe"
        shutil.rmtree(out, ignore_errors=True)
        sizes = ["--smoke", "--workers", "0", "--batch-size", "8", "--time-limit", "5"] if self.args.smoke else [
            "--time-limit", str(SEED_MINUTE)]
        ran = self.finish(o, self.run("seed_recipe", self.python(
            "-m", "benchmarks.seed_recipe", "--train", f"{folders}/train", "--val", f"{folders}/test", "--out",
            str(out), *sizes), self.caps["seed_recipe"]))
        if ran.ok:
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            images = sum(r["train_images"] for r in records)
            rate = images / sum(r["train_images"] / r["images_per_sec"] for r in records)
            last = records[-1]
            o.figures = (f"{last['step']:,} steps ({images:,} images) in {last['train_seconds']:.0f} s: {rate:,.0f} "
                         f"img/s, top-1 {100 * (1 - last['val_top1_error']):.2f}%")

    def bench_loader(self, o: Outcome, batch_size: int, batches: int, *flags: str) -> Ran | None:
        """``bench_loader.py`` on the loader's images, every core a worker (None: no images)."""
        if not self.data:
            o.status = "skipped: no images (see the data step)"
            return None
        sizes = (["--size", "32", "--batch-size", "8", "--batches", "3", "--repeats", "1"] if self.args.smoke else
                 ["--size", "224", "--batch-size", str(batch_size), "--batches", str(batches), "--repeats", "2"])
        command = self.python("benchmarks/bench_loader.py", "--src", self.data["loader_images"], "--replicate",
                              str(self.data["loader_replicate"]), "--workers", str(self.cores), *sizes, *flags)
        # Its staged copy is hard-linked from --src: its temporary directory on the same file system.
        tmp = self.out / "tmp"
        tmp.mkdir(exist_ok=True)
        return self.finish(o, self.run(o.step, command, self.caps[o.step], self.env | {"TMPDIR": str(tmp)}))

    def step_loader(self, o: Outcome, restart_markers: bool) -> None:
        # FFCV left out: its files and numba's compilation would not fit the cap; DALI has a step of its own.
        ran = self.bench_loader(o, 64, 30, "--no-ffcv", "--no-dali", *["--restart-markers"] * restart_markers)
        if ran is not None and ran.ok:
            o.details.append(f"```text\n{ran.stdout.strip()}\n```")
            rates = re.findall(r"^(.+?)\s+(\d+) img/s\s+([\d.]+)x reference", ran.stdout, re.MULTILINE)
            o.figures = "; ".join(f"{name.split(' (')[0]} {int(rate):,} img/s ({ratio}x)" for name, rate, ratio in rates)

    def step_dali_loader(self, o: Outcome) -> None:
        ran = self.bench_loader(o, 256, 10, "--dali-only", "--dali-variants", "--loaders-only")
        if ran is None or not ran.ok:
            return
        o.details.append(f"```text\n{ran.stdout.strip()}\n```")
        found = {(float(load), kind == "region"): (int(rate), float(memory) if memory else None)
                 for load, kind, rate, memory in
                 re.findall(r"^DALI alone, hw decoder load ([\d.]+), (region|whole-image) decoding: (\d+) img/s"
                            r"(?:, pipeline memory ([\d.]+) GiB)?$", ran.stdout, re.MULTILINE)}
        o.figures = "; ".join(f"hw decoder load {load:g}, {'region' if region else 'whole image'}: {rate:,} img/s"
                              for (load, region), (rate, _) in found.items())
        t = self.targets
        for key, load in (("dali_load0", 0.0), ("dali_load1", 1.0)):
            rate = found[load, True][0]
            t[key].measured, t[key].met = f"{rate:,} img/s", rate >= LOADER_RATE
        load = max((0.0, 1.0), key=lambda load: max(found[load, True][0], found[load, False][0]))
        region, whole = found[load, True][0], found[load, False][0]
        t["dali_region"].measured = f"{region:,} against {whole:,} img/s (load {load:g})"
        t["dali_region"].met = region >= whole
        memory = [m for _, m in found.values() if m is not None]
        if memory:
            t["dali_memory"].measured, t["dali_memory"].met = f"{max(memory):.2f} GiB", max(memory) <= DALI_MEMORY_GIB
            o.figures += f"; pipeline memory up to {max(memory):.2f} GiB"
        else:
            t["dali_memory"].measured, t["dali_memory"].met = "none on the CPU (DALI's CPU operators)", True

    def step_dali_end_to_end(self, o: Outcome) -> None:
        if not self.data:
            o.status = "skipped: no shards (see the data step)"
            return
        out = self.out / "runs" / "dali_end_to_end"
        shutil.rmtree(out, ignore_errors=True)  # a new measurement, not a resumed run
        # bench_train.py's end-to-end run (its end_to_end_row), with data.loader=dali
        smoke = self.args.smoke
        overrides = [f"data.dir={self.data['e2e_shards']}", f"output_dir={out}", "name=bench",
                     f"data.image_size={32 if smoke else 224}", f"data.batch_size={8 if smoke else 256}",
                     f"schedule.epochs={2 if smoke else 3}", "schedule.warmup_epochs=0", "train.image_grid=false",
                     "train.checkpoint_every_steps=0", "train.keep_checkpoints=1",
                     f"model.compile={'false' if smoke else 'true'}", f"train.log_every_steps={2 if smoke else 10}",
                     "data.loader=dali"]
        if smoke:
            overrides += ["data.workers=1", "data.shuffle_buffer=8", "data.eval_resize=36",
                          "train.mixed_precision=bf16"]
        command = self.python("train.py", "--config", "configs/imagenet_bn.yaml", *overrides)
        ran = self.finish(o, self.run(o.step, command, self.caps[o.step]))
        if not ran.ok or not (out / "bench" / "metrics.jsonl").is_file():
            return
        records = [json.loads(line) for line in (out / "bench" / "metrics.jsonl").read_text().splitlines() if line]
        later = records[1:]
        if not later:
            o.status += "; fewer than 2 epochs recorded"
            return
        rate = sum(r["train_samples"] for r in later) / (later[-1]["wall_time"] - records[0]["wall_time"])
        wait = sum(r["data_wait_fraction"] for r in later) / len(later)
        o.figures = f"end to end {rate:,.0f} img/s, data wait {wait:.1%}"
        memory = max((r["peak_gpu_gib"] for r in records if "peak_gpu_gib" in r), default=None)
        if memory is not None:
            o.figures += f", peak {memory:.2f} GiB (torch)"
        rows = self.bench_rows
        if rows is None and (self.out / "bench_train.json").is_file():  # measured by an earlier report run
            rows = json.loads((self.out / "bench_train.json").read_text())["rows"]
            rows = {r["name"].split(" (")[0]: r for r in rows}
        t = self.targets
        if rows and "googlenet_bn" in rows:
            share = rate / rows["googlenet_bn"]["images_per_sec"]
            o.figures += f" ({share:.0%} of device)"
            t["dali_end_to_end"].measured, t["dali_end_to_end"].met = f"{share:.0%}", share >= 0.85
        if rows and "end to end" in rows:
            shards = rows["end to end"]["images_per_sec"]
            t["dali_vs_shards"].measured = f"{rate:,.0f} against {shards:,.0f} img/s ({rate / shards:.2f}x)"
            t["dali_vs_shards"].met = rate >= shards
        dip = epoch_start_dip(out / "bench")
        if dip is not None:
            t["dali_dip"].measured = f"slowest first window {dip:.2f}x the median window"
            t["dali_dip"].met = dip >= NO_DIP
            o.figures += f", epoch starts at {dip:.2f}x"
        else:
            t["dali_dip"].measured = "too few log windows to tell"

    def step_cuda_tests(self, o: Outcome) -> None:
        ran = self.finish(o, self.run("cuda_tests", self.python("-m", "pytest", "-q", "-m", "cuda", "-p",
                                                                "no:cacheprovider", *self.cuda_test_files()),
                                      self.caps["cuda_tests"]))
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", ran.stdout)
        o.figures = ", ".join(f"{n} {what}" for n, what in counts if what != "deselected")
        if ran.returncode == 5:  # pytest: nothing collected
            o.status, o.figures = "failed: no test is marked cuda", ""

    def cuda_test_files(self) -> list[str]:
        """The tests folder; in smoke runs only its files that mention the marker (collecting every test
        takes longer on 2 cores than the rest of the step)."""
        if not self.args.smoke:
            return ["tests"]
        return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
                if "mark.cuda" in p.read_text()]

    def finish(self, o: Outcome, ran: Ran) -> Ran:
        o.status, o.seconds = ran.status(), o.seconds + ran.seconds
        if not ran.ok:
            o.details.append(f"{'stderr' if ran.stderr.strip() else 'stdout'}, last lines:\n\n```text\n{ran.tail()}\n```")
        return ran

    # ------------------------------------------------------------------------------------- report
    def steps_table(self) -> str:
        lines = ["| step | status | key figures | seconds |", "| --- | --- | --- | ---: |"]
        for o in self.outcomes.values():
            lines.append(f"| {o.step} | {o.status} | {o.figures or '-'} | {o.seconds:.0f} |")
        return "\n".join(lines)

    def targets_table(self) -> str:
        lines = ["| target (one H100) | measured | |", "| --- | --- | --- |"]
        lines += [f"| {t.what} | {t.measured} | {t.verdict()} |" for t in self.targets.values()]
        return "\n".join(lines)

    def write(self) -> str:
        total = sum(o.seconds for o in self.outcomes.values())
        command = "python -m benchmarks.gpu_report " + shlex.join(sys.argv[1:])
        head = [f"# GPU report{' (smoke)' if self.args.smoke else ''}", "",
                f"{self.device}, torch {self.torch_version}, {self.started:%Y-%m-%d %H:%M} UTC, "
                f"{self.cores} CPU cores; `{command}`; {total:.0f} s of steps.", ""]
        rest = [f"Left out by the budget; to measure them: `{self.rest}`", ""] if self.rest else []
        body = [self.steps_table(), "", *rest, self.targets_table(), ""]
        for o in self.outcomes.values():
            if o.details:
                body += [f"## {o.step}", "", *(d + "\n" for d in o.details)]
        (self.out / "report.md").write_text("\n".join(head + body))
        return "\n".join(head + [self.steps_table(), "", *rest, self.targets_table()])


def epoch_start_dip(run_dir: Path) -> float | None:
    """The slowest first log window of the epochs after the first (the first compiles), over the
    median of those epochs' other windows, from the run's TensorBoard throughput; None when
    there are too few windows."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from pipeline.train.report import event_files, scalar_value

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_epoch = records[0]["step"]  # updates in the first epoch, a whole one
    rates = {}
    for path in event_files(run_dir):
        for event in EventFileLoader(str(path)).Load():
            rates.update({event.step: scalar_value(v) for v in event.summary.value
                          if v.tag == "throughput/images_per_sec"})
    later = sorted(step for step in rates if step > per_epoch)
    firsts = {min(s for s in later if (s - 1) // per_epoch == epoch) for epoch in {(s - 1) // per_epoch for s in later}}
    others = [rates[s] for s in later if s not in firsts]
    if not firsts or not others:
        return None
    return min(rates[s] for s in firsts) / statistics.median(others)


def parse_cap(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in CAPS or not seconds:
        raise argparse.ArgumentTypeError(f"expected NAME=SECONDS with NAME one of {', '.join(CAPS)}: {text!r}")
    return name, float(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md, the plots, runs and logs")
    parser.add_argument("--cifar", type=Path,
                        help="CIFAR-10 as prepared shards, class folders (train/, test/) or the binary archive "
                        "(default: ../shared/data/cifar10-jpg.tar.gz when there)")
    parser.add_argument("--smoke", action="store_true", help="the same steps at tiny sizes on the CPU")
    parser.add_argument("--steps", nargs="+", choices=STEPS, help="run only these steps (and data when they need it)")
    parser.add_argument("--cap", nargs="+", type=parse_cap, default=[], metavar="NAME=SECONDS",
                        help=f"change a step's time cap (NAME: {', '.join(CAPS)})")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help=f"start a step only if its cap fits in what is left of SECONDS (default: {DEFAULT_BUDGET} "
                        "when no --steps are named and not --smoke, else none); the report names the steps left out")
    args = parser.parse_args(argv)
    default_plan = args.steps is None and not args.smoke
    args.steps = args.steps or list(STEPS)
    args.cap = dict(args.cap)
    steps = set(args.steps) | ({"data"} if NEEDS_DATA & set(args.steps) else set())
    report = Report(args)
    report.query_device()
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET if default_plan else float("inf")
    started, left_out = time.monotonic(), []
    for name in STEPS:
        if name not in steps:
            continue
        outcome = report.outcomes[name]
        left = budget - (time.monotonic() - started)
        if report.caps[name] + (report.caps["cifar10_report"] if name == "cifar10" else 0) > left:
            outcome.status = f"not run: its cap ({report.caps[name]:g} s) is over what is left of the budget ({left:.0f} s)"
            left_out.append(name)
            continue
        try:
            if name.startswith("loader"):
                report.step_loader(outcome, restart_markers=name == "loader_restart")
            else:
                getattr(report, f"step_{name}")(outcome)
        except Exception as exc:  # a figure that could not be read: recorded, and the report goes on
            outcome.status = f"failed: {type(exc).__name__}: {exc}"
        report.write()
    if left_out:
        report.rest = f"python -m benchmarks.gpu_report --out {shlex.quote(str(args.out))} --steps {' '.join(left_out)}"
    print(report.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
