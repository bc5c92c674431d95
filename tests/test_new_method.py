"""Adding a method touches one file: the example of docs/algorithms.md, dropped into a copy of the package as
the only new file, is known to the config, the sweeps and the report's order, and trains under the real entry
point with the weights it defines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, TINY, sets


def example_source() -> str:
    text = (REPO / "docs" / "algorithms.md").read_text()
    block = re.search(r"<!-- new-method-example -->\s*```python\n(.*?)```\s*<!-- /new-method-example -->", text,
                      re.S)
    assert block, "docs/algorithms.md lost its new-method example"
    return block.group(1)


def test_a_new_method_is_one_file(tmp_path, data_cache):
    root = tmp_path / "copy"
    for tree in ("hpcfl", "jobs"):
        shutil.copytree(REPO / tree, root / tree, ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    (root / "hpcfl" / "algorithms" / "inverse_loss.py").write_text(example_source())
    after = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len(after) == len(before) + 1  # the one new file, nothing else edited

    def run(*args, timeout=240):
        # the copy comes first on the path: its hpcfl, not the installed one
        return subprocess.run(["timeout", "-k", "10", str(timeout), sys.executable, *args], cwd=root,
                              capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                                                                   "HPCFL_NO_MPI": "1"})

    known = run("-c", "import hpcfl.algorithms as a, hpcfl.config as c; print(a.available()[-1]); "
                      "print(c.load(None, ['algorithm.name=inverse_loss', 'algorithm.loss_floor=0.01']).algorithm)")
    assert known.returncode == 0, known.stderr
    assert known.stdout.splitlines()[0] == "inverse_loss"  # listed after the paper's methods
    assert "loss_floor=0.01" in known.stdout
    refused = run("-c", "import hpcfl.config as c; c.load(None, ['algorithm.name=inverse_loss', "
                        "'algorithm.loss_floor=0'])")
    assert "algorithm.loss_floor: 0.0 is out of range (must be > 0.0)" in refused.stderr

    out = tmp_path / "run"
    p = run("-m", "hpcfl.run", "--out", str(out), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=2",
                                                          "algorithm.name=inverse_loss"))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["algorithm"] for line in lines] == ["inverse_loss"] * 2
    for line in lines:
        inverse = 1 / np.maximum(line["stats"]["loss"], 1e-3)
        np.testing.assert_allclose(line["weights"], inverse / inverse.sum(), rtol=1e-12)

    sweep = run("-m", "jobs", "sweep", "--algorithms", "fedavg", "inverse_loss", "--out-root", str(tmp_path / "sw"),
                "--launcher", "local", "--ranks", "1", "--set", "run.rounds=1")
    assert sweep.returncode == 0, sweep.stderr
    assert "inverse_loss-s0" in (tmp_path / "sw" / "cells.tsv").read_text()
