"""Running sweeps: SLURM and local launchers (submitit), preemption, failure records, run-directory locks."""
