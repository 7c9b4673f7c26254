"""Operations: the Accelerator every entry point runs under (``launch``), one live job per run
directory (``run_lock``), stopping with a checkpoint when the scheduler says so (``preemption``),
the stacks of a process that stops moving (``stall_watch``), and submitting to SLURM (``slurm``) or to
Kubernetes as a Kubeflow TrainJob (``k8s``)."""
