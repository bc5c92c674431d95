"""Cluster jobs for hpcfl: Slurm job-array sweeps, a local sweep runner and sbatch templates.

``python -m jobs sweep ...`` (see ``jobs/sweep.py``), ``python -m jobs status OUT_ROOT``; copyable job scripts in
``jobs/templates/``; the whole story in ``docs/cluster.md``.
"""
