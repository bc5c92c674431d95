"""jobs/: the sweep generator (Slurm job arrays, the local runner), the status command and the sbatch templates.

No Slurm here: generated scripts are checked as text and with ``bash -n``, and the job-array script is also run
for real with stand-ins for srun/mpirun/scontrol on PATH (they record their arguments and play hpcfl's exit
codes), which exercises its cell selection, signal forwarding and requeue. One real local sweep runs hpcfl.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcfl.algorithms import available
from hpcfl.config import load
from hpcfl.run import parse_args
from jobs.__main__ import main
from jobs.cells import split_values
from jobs.scripts import launch_block
from tests.conftest import FROM_SCRATCH, REPO, mpiexec

CONFIG = str(REPO / "configs" / "default.toml")
TEMPLATES = REPO / "jobs" / "templates"
BASE = ["sweep", "--config", CONFIG, "--algorithms", "fedavg", "fedism", "--seeds", "0", "1", "2",
        "--grid", "benchmark.num_corrupted=2,4,6"]


def sweep(tmp_path, *extra, root="sweep1"):
    out_root = tmp_path / root
    rc = main([*BASE, "--out-root", str(out_root), *extra])
    return rc, out_root


def cells(out_root: Path) -> list[tuple[int, str, list[str]]]:
    rows = []
    for line in (out_root / "cells.tsv").read_text().splitlines():
        if not line.startswith("#"):
            index, run_dir, args = line.split("\t")
            rows.append((int(index), run_dir, shlex.split(args)))
    return rows


def directives(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def bash_syntax_ok(path: Path) -> None:
    p = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------------------------------ generated text

def test_job_array_for_2_algorithms_3_seeds_3_grid_values(tmp_path, capsys):
    rc, out_root = sweep(tmp_path)
    assert rc == 0, capsys.readouterr().err
    script = (out_root / "sweep.sbatch").read_text()
    d = directives(script)
    assert "--array=0-17" in d and "--ntasks=6" in d and "--nodes=1" in d and "--time=04:00:00" in d
    assert "--signal=B:USR1@300" in d and "--requeue" in d and "--open-mode=append" in d
    assert f"--output={out_root}/logs/%A_%a.out" in d and f"--chdir={Path.cwd()}" in d
    assert not any(x.startswith(("--gres", "--partition", "--account", "--ntasks-per-node")) for x in d)
    assert (out_root / "logs").is_dir()
    bash_syntax_ok(out_root / "sweep.sbatch")
    assert "LAUNCHER=srun\n" in script and "RANKS=6\n" in script and f"PYTHON={sys.executable}\n" in script
    assert launch_block() in script  # the same launch block as the templates

    rows = cells(out_root)
    assert [r[0] for r in rows] == list(range(18))
    assert len({r[1] for r in rows}) == 18
    expected = {(a, k, s) for a in ("fedavg", "fedism") for k in (2, 4, 6) for s in (0, 1, 2)}
    seen = set()
    for index, run_dir, args in rows:
        ns = parse_args(args)  # hpcfl.run's own parser takes them
        cfg = load(ns.config, ns.overrides)
        key = (cfg.algorithm.name, cfg.benchmark.num_corrupted, cfg.run.seed)
        seen.add(key)
        assert run_dir == str(out_root / f"{key[0]}-num_corrupted={key[1]}-s{key[2]}")
        assert str(ns.out) == run_dir and args[-2:] == ["--out", run_dir]
        assert args[:6] == ["--config", CONFIG, "--set", f"algorithm.name={key[0]}", "--set", f"run.seed={key[2]}"]
    assert seen == expected


def test_gpus_partition_account_max_parallel_and_mpirun(tmp_path, capsys):
    rc, out_root = sweep(tmp_path, "--gpus-per-node", "4", "--ranks", "5", "--set", "run.device=cuda",
                         "--partition", "gpu", "--account", "proj1", "--max-parallel", "4", "--time", "1-00:00:00",
                         "--signal-seconds", "600", "--launcher", "mpirun", "--cpus-per-task", "8",
                         "--prelude", "module load openmpi/4.1")
    assert rc == 0, capsys.readouterr().err
    script = (out_root / "sweep.sbatch").read_text()
    d = directives(script)
    for want in ("--array=0-17%4", "--gres=gpu:4", "--ntasks=5", "--partition=gpu", "--account=proj1",
                 "--time=1-00:00:00", "--signal=B:USR1@600", "--cpus-per-task=8"):
        assert want in d
    assert "LAUNCHER=mpirun\n" in script and "\nmodule load openmpi/4.1\n" in script
    assert all("--set run.device=cuda" in shlex.join(args) for _, _, args in cells(out_root))
    bash_syntax_ok(out_root / "sweep.sbatch")

    rc, out_root = sweep(tmp_path, "--nodes", "2", "--ranks", "9", root="two-nodes")
    assert rc == 0
    d = directives((out_root / "sweep.sbatch").read_text())
    assert "--nodes=2" in d and "--ntasks=9" in d and "--ntasks-per-node=5" in d


def test_templates_are_valid_and_share_the_launch_block():
    block = launch_block()
    for name in ("single_node.sbatch", "multi_node.sbatch"):
        text = (TEMPLATES / name).read_text()
        bash_syntax_ok(TEMPLATES / name)
        assert block in text, f"{name}: the launch block differs from single_node.sbatch's"
        d = directives(text)
        assert "--signal=B:USR1@300" in d and "--requeue" in d and "--gres=gpu:4" in d
        assert "--open-mode=append" in d
    assert "--ntasks=5" in directives((TEMPLATES / "single_node.sbatch").read_text())
    assert {"--nodes=2", "--ntasks=9", "--ntasks-per-node=5"} <= set(
        directives((TEMPLATES / "multi_node.sbatch").read_text()))


def test_docs_use_only_options_the_sweep_has():
    import argparse

    from jobs.sweep import add_sweep_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_sweep_parser(sub)
    known = {o for a in sub.choices["sweep"]._actions for o in a.option_strings}
    text = (REPO / "docs" / "cluster.md").read_text().replace("\\\n", " ")
    used = {o for line in text.splitlines() if "python -m jobs sweep" in line for o in re.findall(r"--[a-z-]+", line)}
    assert used and used <= known, used - known


def test_grid_values_keep_commas_inside_brackets_and_quotes():
    assert split_values('1,2,[3, 4],"a,b"') == ["1", "2", "[3, 4]", '"a,b"']


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("extra, message", [
    (["--algorithms", "fedsim"], "unknown algorithm(s) fedsim (known: " + ", ".join(available()) + ")"),
    (["--grid", "benchmark.num_corrupted"], "expected section.key=v1,v2"),
    (["--grid", "num_corrupted=2,4"], "the key must be section.key"),
    (["--grid", "benchmark.num_corrupted=2,,4"], "an empty value"),
    (["--grid", "benchmark.num_corrupted=[2,4"], "unbalanced brackets"),
    (["--grid", "run.seed=1,2"], "the sweep sets run.seed itself (use --seeds)"),
    (["--grid", "benchmark.num_corrupted=2,2"], "value(s) 2 listed twice"),
    (["--grid", "train.lr=1e-3,0.001"], "duplicate cells"),
    (["--seeds", "0", "0"], "duplicate cells: --seeds lists 0 more than once"),
    (["--ranks", "0"], "--ranks must be >= 1, got 0"),
    (["--ranks", "30"], "has only 20 clients: use --ranks 21 or fewer"),
    (["--set", "train.lrr=0.1"], "unknown key train.lrr"),
    (["--grid", "benchmark.num_corrupted=4,40"], "cell 1 ("),
    (["--set", "run.out=x"], "the sweep sets run.out itself"),
    (["--gpus-per-node", "2"], "run.device is 'cpu'"),
    (["--time", "4h"], "--time '4h'"),
    (["--time", "00:04:00", "--signal-seconds", "300"], "not shorter than --time"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    out_root = tmp_path / "root"
    argv = ["sweep", "--config", CONFIG, "--algorithms", "fedavg", "--out-root", str(out_root), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("jobs sweep: error: ") and len(err.strip().splitlines()) == 1
    assert not out_root.exists()


def test_refusals_from_the_command_line(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on it, even where Slurm is installed
    run = lambda *a: subprocess.run([sys.executable, "-m", "jobs", *a], cwd=REPO, env=env, capture_output=True,
                                    text=True, timeout=60)
    p = run("sweep", "--algorithms", "fedsim", "--out-root", str(tmp_path / "a"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "known: fedavg, afl" in p.stderr
    p = run("sweep", "--algorithms", "fedavg", "--out-root", str(tmp_path / "b"), "--submit")
    assert p.returncode == 2 and "sbatch is not on PATH" in p.stderr and not (tmp_path / "b").exists()
    p = run("status", str(tmp_path / "nothing"))
    assert p.returncode == 2 and "cells.tsv not found" in p.stderr and "Traceback" not in p.stderr


def test_an_existing_different_sweep_is_not_overwritten(tmp_path, capsys):
    assert sweep(tmp_path)[0] == 0
    before = (tmp_path / "sweep1" / "cells.tsv").read_text()
    assert sweep(tmp_path)[0] == 0  # the same sweep again: fine (resubmitting resumes)
    rc, out_root = sweep(tmp_path, "--set", "train.lr=0.01")
    assert rc == 2 and "differs from this sweep's" in capsys.readouterr().err
    assert (out_root / "cells.tsv").read_text() == before
    assert sweep(tmp_path, "--set", "train.lr=0.01", "--force")[0] == 0
    assert (out_root / "cells.tsv").read_text() != before


# ------------------------------------------------------------- the job-array script, run with stand-ins

FAKE_LAUNCHER = r"""#!/bin/bash
# Stands in for srun/mpirun: records its arguments; FAKE_RC=wait waits for USR1/TERM and exits 3 (as hpcfl does).
echo "$(basename "$0") $*" >> "$FAKE_LOG"
if [ "${FAKE_RC:-0}" = wait ]; then
    sleep 30 &
    sleeper=$!
    trap 'kill $sleeper; echo "launcher got USR1" >> "$FAKE_LOG"; exit 3' USR1
    trap 'kill $sleeper; echo "launcher got TERM" >> "$FAKE_LOG"; exit 3' TERM
    touch "$FAKE_LOG.ready"
    wait $sleeper
    exit 9
fi
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name in ("srun", "mpirun"):
        (bin_dir / name).write_text(FAKE_LAUNCHER)
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "fake.log"

    def run_task(script: Path, task: int, rc="0", restarts=0, send=None):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_RC": rc,
               "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": str(restarts)}
        log.unlink(missing_ok=True)
        Path(f"{log}.ready").unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        if send is not None:
            deadline = time.time() + 20
            while not Path(f"{log}.ready").exists() and time.time() < deadline:
                time.sleep(0.05)
            if send == "USR1":  # Slurm's warning goes to the batch shell only (--signal=B:...)
                os.kill(proc.pid, signal.SIGUSR1)
            else:  # cancellation or the time limit: every process of the job gets TERM
                os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out, (log.read_text().splitlines() if log.exists() else [])

    return run_task


def test_array_task_runs_its_cell_with_srun_or_mpirun(tmp_path, fake_slurm):
    rc, out_root = sweep(tmp_path)
    assert rc == 0
    rows = cells(out_root)
    code, out, calls = fake_slurm(out_root / "sweep.sbatch", 5)
    assert code == 0 and "hpcfl job: done" in out, out
    assert calls == [shlex.join(["srun", "--mpi=pmi2", "-n", "6", sys.executable, "-m", "hpcfl.run", *rows[5][2]])]

    assert main([*BASE, "--out-root", str(tmp_path / "m"), "--launcher", "mpirun", "--ranks", "3"]) == 0
    rows = cells(tmp_path / "m")
    code, out, calls = fake_slurm(tmp_path / "m" / "sweep.sbatch", 17, rc="1")
    assert code == 1 and "failed with exit code 1" in out
    assert calls == [shlex.join(["mpirun", "-n", "3", sys.executable, "-m", "hpcfl.run", *rows[17][2]])]

    code, out, calls = fake_slurm(out_root / "sweep.sbatch", 18)  # no such cell
    assert code == 2 and "no cell 18" in out and calls == []
    with open(out_root / "cells.tsv", "a") as f:
        f.write("18\tx\t--out x\n")
    code, out, calls = fake_slurm(out_root / "sweep.sbatch", 0)
    assert code == 2 and "changed after this script was written" in out and calls == []


def test_usr1_is_forwarded_and_exit_3_requeues(tmp_path, fake_slurm):
    rc, out_root = sweep(tmp_path)
    assert rc == 0
    script = out_root / "sweep.sbatch"
    code, out, calls = fake_slurm(script, 2, rc="wait", send="USR1")
    assert code == 3, out
    assert "launcher got USR1" in calls and calls[-1] == "scontrol requeue 777"
    assert "requeueing job 777" in out

    code, out, calls = fake_slurm(script, 2, rc="3", restarts=20)  # too many restarts: no more requeues
    assert code == 3 and not any(c.startswith("scontrol") for c in calls) and "restarted 20 times" in out
    code, out, calls = fake_slurm(script, 2, rc="wait", send="TERM")  # cancelled / out of time: no requeue
    assert code == 3 and not any(c.startswith("scontrol") for c in calls) and "after TERM" in out, (out, calls, code)
    code, out, calls = fake_slurm(script, 2, rc="2")
    assert code == 2 and not any(c.startswith("scontrol") for c in calls)


# ------------------------------------------------------------------------------------- a real local sweep

@pytest.mark.mpi
def test_local_sweep_runs_every_cell_and_reports_per_corrupted_count(tmp_path):
    """docs/results.md's study in miniature: sweep -> sweep.sh under mpiexec -> status -> the report's tables."""
    mpiexec()  # skip-or-fail early with the usual message when there is no MPI
    out_root = tmp_path / "local"
    tiny = ["run.rounds=2", "benchmark.num_train=200", "benchmark.num_test=100", "benchmark.image_size=16",
            *FROM_SCRATCH, "model.width=4", f"data.cache_dir={tmp_path / 'data'}"]
    cmd = [sys.executable, "-m", "jobs", "sweep", "--config", CONFIG, "--algorithms", "fedavg", "fedism",
           "--seeds", "0", *[a for s in tiny for a in ("--set", s)], "--grid", "benchmark.num_corrupted=2,4",
           "--ranks", "2", "--launcher", "local", "--out-root", str(out_root), "--submit"]
    p = subprocess.run(["timeout", "-k", "10", "400", *cmd], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "hpcfl sweep summary" in p.stdout
    names = [f"{a}-num_corrupted={c}-s0" for a in ("fedavg", "fedism") for c in (2, 4)]
    for name in names:
        run_dir = out_root / name
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2 and json.loads(lines[0])["algorithm"] == name.split("-")[0]
        assert "finished" in json.loads((run_dir / "run.json").read_text())
        assert re.search(rf"^ +\d+  done +{re.escape(str(run_dir))}$", p.stdout, re.M), p.stdout
    bash_syntax_ok(out_root / "sweep.sh")
    p = subprocess.run([sys.executable, "-m", "jobs", "status", str(out_root)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "4 of 4 cells finished" in p.stdout

    report_dir = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "hpcfl.report", str(out_root), "--last", "2", "--out",
                        str(report_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    md = (report_dir / "report.md").read_text()
    assert "benchmark.num_corrupted=2" in md and "benchmark.num_corrupted=4" in md  # one table per count
    with open(report_dir / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["benchmark.num_corrupted"], r["method"]) for r in rows) == [
        ("2", "fedavg"), ("2", "fedism"), ("4", "fedavg"), ("4", "fedism")]
    assert all(r["num_values"] == "2" and r["corrupted_set"] == "gaussian_2" for r in rows)
    assert len(list(report_dir.glob("gap_*.png"))) == 2 and len(list(report_dir.glob("weights_*.png"))) == 4


def test_a_local_sweep_never_runs_its_paths_as_code_and_checks_its_cells(tmp_path):
    """sweep.sh quotes every value it holds (an out-root with $(...) and quotes in it is a name, not a command),
    and refuses a cells.tsv changed since it was written."""
    out_root = tmp_path / 'odd $(touch PWNED) "name"'
    cmd = [sys.executable, "-m", "jobs", "sweep", "--config", CONFIG, "--algorithms", "fedavg", "--seeds", "0",
           "--set", f"data.source={tmp_path / 'no-such-shards'}", "--ranks", "1", "--launcher", "local",
           "--out-root", str(out_root)]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    script = out_root / "sweep.sh"
    p = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "bad input (exit 2)" in p.stdout, p.stdout + p.stderr  # the one cell ran, refused
    assert f"=== hpcfl sweep summary ({out_root}, 1 cells)" in p.stdout
    assert not list(tmp_path.rglob("PWNED"))
    cells = out_root / "cells.tsv"
    cells.write_text(cells.read_text().replace("fedavg", "fedism"))
    p = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "changed after this script was written" in p.stderr
