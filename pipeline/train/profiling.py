"""Where a training step's time goes: ``train.profile_steps=N`` profiles N updates with torch.profiler.

    profiler = StepProfiler.for_run(run)            # does nothing unless train.profile_steps > 0
    with profiler:                                  # around an epoch's updates
        with profiler.region("forward"): ...        # each phase of an update (PHASES)
        profiler.step()                             # at the end of each update

The job's first WARMUP_STEPS updates are not profiled (allocations, cuDNN's autotuning,
compilation, the loader's start; the last one is torch.profiler's own warm-up, whose events are
dropped); the N after them are, within the job's first epoch (its end's validation and
checkpoint are no update): fewer if the epoch or the run ends sooner, said in one line. Every
process then writes its Chrome trace, ``profile/trace-rankR.json.gz`` in the run directory
(Perfetto, ui.perfetto.dev, and chrome://tracing open it; in a job of several processes a rank
that waits for the others shows only beside theirs), and the table of where the step's time
goes (``profile/summary-rankR.txt``), from the profiler's own events: the total of each phase's
region over the total of torch.profiler's ProfilerStep regions, one per update; "other" is the
rest of the update (metric sums, seeding, the progress bar, checkpoints, the stop poll). The
main process prints its table. Training then goes on unchanged: the profiler reads no random
numbers and touches no tensor, so the weights are those of a run without it.

Outside the profiled window (and with profile_steps=0) ``region`` is one shared nullcontext:
a ``record_function`` costs about 5 us even with no profiler running, a nullcontext 0.2 us.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

PHASES = ("data wait", "host-to-device", "forward", "backward", "optimizer", "ema", "logging")
REGION_PREFIX = "train/"  # the regions' names in the trace: train/forward, ...
WAIT_STEPS, PROFILER_WARMUP_STEPS = 3, 1
WARMUP_STEPS = WAIT_STEPS + PROFILER_WARMUP_STEPS
STEP_REGION = "ProfilerStep*"  # key_averages' name for torch.profiler's ProfilerStep#N regions
NOT_RECORDING = contextlib.nullcontext()


class StepProfiler:
    """torch.profiler over ``steps`` updates after the warm-up (0: off). ``first_update``: the
    number of the first profiled update in the run; ``announce``: prints the table (the main
    process's ``run.log``)."""

    def __init__(self, steps: int = 0, directory: Path | None = None, rank: int = 0,
                 device: torch.device = torch.device("cpu"), first_update: int = 0, announce=print):
        self.steps, self.directory, self.rank, self.device = steps, directory, rank, device
        self.first_update, self.announce = first_update, announce
        self.profiler: profile | None = None  # torch's, while the window is open
        self.opened = False
        self.stepped = 0

    @classmethod
    def for_run(cls, run) -> StepProfiler:
        asked, acc, layout, step = run.config.train.profile_steps, run.accelerator, run.layout, run.progress.step
        if not asked:
            return NO_PROFILE
        left = min(layout.updates_per_epoch - step % layout.updates_per_epoch, layout.total_updates - step)
        left = max(left - WARMUP_STEPS, 0)
        if left < asked:
            run.log(f"train.profile_steps={asked}: only {left} steps left after the {WARMUP_STEPS} warm-up steps "
                    f"in this epoch (a profile stays within the job's first epoch): "
                    + (f"profiling {left}" if left else "nothing is profiled"))
        return cls(min(asked, left), run.run_dir / "profile", acc.process_index, acc.device,
                   first_update=step + WARMUP_STEPS + 1, announce=run.log)

    def region(self, phase: str):
        """A named region of the trace around one phase of the update, while profiling."""
        return NOT_RECORDING if self.profiler is None else record_function(REGION_PREFIX + phase)

    def __enter__(self) -> StepProfiler:
        if self.steps and not self.opened:  # the first epoch of the job only
            self.opened = True
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, on_trace_ready=self.write,
                                    schedule=schedule(wait=WAIT_STEPS, warmup=PROFILER_WARMUP_STEPS,
                                                      active=self.steps, repeat=1))
            self.profiler.start()
        return self

    def step(self) -> None:
        """The end of an update (after the window's last one, torch.profiler calls ``write``)."""
        if self.profiler is not None:
            self.profiler.step()
            self.stepped += 1
            if self.stepped == WARMUP_STEPS + self.steps:
                self.close()

    def __exit__(self, *exc) -> None:
        if self.profiler is not None:  # the updates stopped inside the window: a stop signal, an error
            self.steps = 0  # then write() writes nothing: its last step is incomplete
            self.close()
            self.announce("the profile was cut short by the run's stop: no trace written")

    def close(self) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.stop()

    def write(self, profiler: profile) -> None:
        if not self.steps:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        trace = self.directory / f"trace-rank{self.rank}.json.gz"
        profiler.export_chrome_trace(str(trace))
        last = self.first_update + self.steps - 1
        text = (f"profile of updates {self.first_update}-{last} ({self.steps} steps, process {self.rank}, "
                f"{self.device.type}); trace: {trace}\n" + phase_table(profiler.key_averages(), self.steps,
                                                                     device_time=self.device.type == "cuda"))
        (self.directory / f"summary-rank{self.rank}.txt").write_text(text + "\n")
        self.announce(text)


NO_PROFILE = StepProfiler()  # off: stateless, so one is shared


def phase_table(averages, steps: int, device_time: bool = False) -> str:
    """Each phase's total time, its time per step and its share of the step, from the
    profiler's averages (``key_averages``; CPU times: the host's wall time in the region;
    ``device_time``: also the GPU time of the kernels launched in it, per step)."""
    by_name = {average.key: average for average in averages}
    names = {phase: REGION_PREFIX + phase for phase in PHASES}

    def times(name: str) -> tuple[float, float]:  # (host ms, device ms), over all the steps
        average = by_name.get(name)
        return (0.0, 0.0) if average is None else (average.cpu_time_total / 1e3, average.device_time_total / 1e3)

    rows = {phase: times(name) for phase, name in names.items()}
    step = times(STEP_REGION)
    rows["other"] = (step[0] - sum(host for host, _ in rows.values()),
                     step[1] - sum(device for _, device in rows.values()))
    rows["step"] = step
    header = f"{'phase':<16}{'total ms':>10}{'ms/step':>10}{'share':>8}" + (f"{'GPU ms/step':>13}" if device_time else "")
    lines = [header]
    for phase, (host, device) in rows.items():
        share = 100 * host / step[0] if step[0] else 0.0
        lines.append(f"{phase:<16}{host:>10.1f}{host / steps:>10.1f}{share:>7.1f}%"
                     + (f"{device / steps:>13.1f}" if device_time else ""))
    return "\n".join(lines)
