"""Training: the objects of a run (``run``), the loop (``trainer``), one update (``step``), the
weights' average (``ema``), exact validation, the recipe at a scale, schedules, checkpoints,
logging (``tracking``) and the time-to-accuracy report. The command line of ``train.py`` is
``cli``."""
