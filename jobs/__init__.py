"""Cluster jobs for hpcfl: Slurm job-array sweeps, a local sweep runner and sbatch templates.

``python -m jobs sweep ...`` (``sweep.py``: the command; ``cells.py``: the cells and cells.tsv; ``scripts.py``: the
job scripts from ``templates/``), ``python -m jobs status OUT_ROOT`` (``status.py``); copyable job scripts in
``templates/``; the whole story in ``docs/cluster.md``.
"""
