"""Submission side of ftjob: what runs on a login node or laptop (Slurm, Kubernetes, sweeps)."""
