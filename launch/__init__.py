"""Job submission to Slurm (submitit) or local processes."""
