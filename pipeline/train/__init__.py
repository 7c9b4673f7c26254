"""Training: the objects of a run (``run``), the loop (``trainer``), one update (``step``), the
weights' average (``ema``), exact validation, the recipe at a scale, schedules, checkpoints and
reading a run back (``checkpoint``, ``saved_runs``), starting from trained weights
(``fine_tune``), logging (``tracking``: TensorBoard and metrics.jsonl; ``trackers``: where the
scalars go, TensorBoard, MLflow, W&B, Aim) the time-to-accuracy report and profiling a few steps (``profiling``). The command line of
``train.py`` is ``cli``."""
