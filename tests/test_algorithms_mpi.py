"""Every method and variant end to end on the built-in benchmark: single-rank and mpiexec -n 3 agree."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests import fingerprint
from tests.conftest import REPO, final_vector, mpiexec, read_metrics, sets

pytestmark = pytest.mark.mpi

CASES = fingerprint.cases()
# the BatchNorm ResNet from its built-in pretrained start (a small pool, so that the first launch makes it fast)
PRETRAINED = ["model.name=resnet8", "model.pretrained_path=builtin", "pretrain.images=300", "pretrain.epochs=1",
              "algorithm.name=fedism"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """Every case of tests/fingerprint.py, single-rank and under mpiexec -n 3 (one launch each). Under MPI every
    other case is tested on the test sets by the client ranks (eval.placement), the rest by the server."""
    root = tmp_path_factory.mktemp("algos")
    for n in (1, 3):
        jobs = [["--out", str(root / f"{name}-{variant}-n{n}"),
                 *sets(*fingerprint.SETTINGS, f"data.cache_dir={data_cache}", f"algorithm.name={name}",
                       f"algorithm.variant={variant}", f"eval.placement={('clients', 'server')[k % 2]}")]
                for k, (name, variant) in enumerate(CASES)]
        jobs.append(["--out", str(root / f"resnet8-builtin-n{n}"),
                     *sets(*fingerprint.SETTINGS, *PRETRAINED, f"data.cache_dir={data_cache}")])
        (root / f"jobs{n}.json").write_text(json.dumps(jobs))
        # under MPI, no object may be pickled by mpi4py in the whole run (design invariant 1)
        cmd = [sys.executable, str(REPO / "tests" / "run_many.py"), str(root / f"jobs{n}.json"), "--forbid-pickle"]
        if n > 1:
            cmd = [mpiexec(), "-n", str(n), *cmd]
        p = subprocess.run(["timeout", "-k", "10", "600", *cmd], cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-4000:]
    return root


def test_every_case_matches_its_recorded_fingerprint(runs):
    """The results of every method, single-rank and under MPI, are those recorded before the restructuring
    (tests/fingerprint.py): a change of layout must not move a single bit."""
    store = fingerprint.stored()
    assert sorted(store["fingerprints"]) == sorted(fingerprint.case_name(*c) for c in CASES)
    for name, variant in CASES:  # world sizes agree everywhere, whatever the machine
        assert fingerprint.fingerprint(runs / f"{name}-{variant}-n1") == \
            fingerprint.fingerprint(runs / f"{name}-{variant}-n3"), (name, variant)
    differences = fingerprint.environment_differences(store["environment"])
    if differences:
        pytest.skip("fingerprints were recorded in another environment (" + "; ".join(differences) + ")")
    assert store["settings"] == fingerprint.SETTINGS
    moved = [fingerprint.case_name(name, variant) for name, variant in CASES
             if fingerprint.fingerprint(runs / f"{name}-{variant}-n1")
             != store["fingerprints"][fingerprint.case_name(name, variant)]]
    assert not moved, f"results moved for {moved}"


@pytest.mark.parametrize("name,variant", CASES)
def test_method_runs_and_single_rank_equals_mpi(runs, name, variant):
    single, mpi = runs / f"{name}-{variant}-n1", runs / f"{name}-{variant}-n3"
    a, b = read_metrics(single), read_metrics(mpi)
    assert [m["round"] for m in a] == [0, 1, 2] and all(m["algorithm"] == name for m in a)
    for x, y in zip(a, b):
        assert x["weights"] == pytest.approx(y["weights"], abs=1e-12)
        assert x["stats"].keys() == y["stats"].keys()
        for k in x["stats"]:
            np.testing.assert_allclose(x["stats"][k], y["stats"][k], rtol=1e-9, atol=1e-12)
        assert x["metrics"] == y["metrics"]
    np.testing.assert_array_equal(final_vector(single), final_vector(mpi))
    w = np.array([m["weights"] for m in a])
    keep = np.array([m["keep"] for m in a])
    assert np.all(w >= 0) and np.allclose(w.sum(1) + keep, 1)
    assert (keep > 0).all() if variant == "qffl" else (keep == 0).all()  # q-FFL keeps part of w^t
    stats = a[-1]["stats"]
    expected = {"fedism": "sharpness", "fedism_plus": "sharpness", "qfedavg": "loss", "afl": "loss",
                "fairfed": "bacc", "fedce": "cosine", "fedga": "loss_prev_local"}.get(name)
    if expected:
        assert expected in stats and np.all(np.isfinite(stats[expected]))
    if name == "afl" and variant == "as_coded":
        assert sorted(w[0])[-1] == 1.0  # one-hot
    if name == "fedavg":
        assert not np.allclose(w[0], 1 / 20)  # data-size weighted


def test_the_batchnorm_resnet_from_its_pretrained_start_is_the_same_single_rank_and_under_mpi(runs):
    single, mpi = runs / "resnet8-builtin-n1", runs / "resnet8-builtin-n3"
    np.testing.assert_array_equal(final_vector(single), final_vector(mpi))
    a, b = read_metrics(single), read_metrics(mpi)
    assert [x["metrics"] for x in a] == [x["metrics"] for x in b] and len(a) == 3
    logs = (single / "logs" / "rank_0.log").read_text() + (mpi / "logs" / "rank_0.log").read_text()
    assert logs.count("built the pretrained start") == 1  # made once, by the first launch's server, then cached
