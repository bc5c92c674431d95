"""python -m hpcfl.report: grouping, statistics, refusals, the CSV and the figures (hand-made run directories),
and one end-to-end check on real runs of python -m hpcfl.run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpcfl.config import dumps_toml
from hpcfl.data.shards import Manifest, ShardEntry
from hpcfl.report import corrupted_clients, load_run, report
from hpcfl.report.cli import expand_sweep_roots, main
from tests.conftest import FROM_SCRATCH

REPO = Path(__file__).resolve().parents[1]

# Seed 0 and seed 1 of the reference numbers: 7 rounds, the first 2 outside the last-5 window (values 0.0).
CLEAN = {0: [0.0, 0.0, 0.5, 0.6, 0.7, 0.8, 0.9], 1: [0.0, 0.0, 0.6, 0.7, 0.8, 0.9, 1.0]}
CORRUPTED = {0: [0.0, 0.0, 0.4, 0.4, 0.5, 0.7, 0.6], 1: [0.0, 0.0, 0.3, 0.6, 0.8, 0.6, 0.9]}


def make_run(root: Path, name: str, *, algorithm: str = "fedavg", seed: int = 0, rounds: int = 7,
             clean: list | None = None, corrupted: list | None = None, test_sets=("clean", "gaussian_3"),
             config: dict | None = None, info: dict | None = None, num_clients: int = 4,
             finished: bool = True, lines: int | None = None) -> Path:
    """A run directory written by hand: config.toml, run.json and metrics.jsonl with known BACC values
    (AUC = BACC + 0.1 on the clean set, BACC + 0.05 on the others)."""
    clean = CLEAN[seed % 2] if clean is None else clean
    corrupted = CORRUPTED[seed % 2] if corrupted is None else corrupted
    path = root / name
    path.mkdir(parents=True)
    cfg = {"run": {"seed": seed, "rounds": rounds, "out": str(path)}, "data": {"source": "builtin"},
           "benchmark": {"num_clients": num_clients, "num_corrupted": 1, "corruption": "gaussian", "severity": 3},
           "algorithm": {"name": algorithm}, "eval": {"every": 1}}
    for key, value in (config or {}).items():
        section, k = key.split(".")
        cfg.setdefault(section, {})[k] = value
    (path / "config.toml").write_text(dumps_toml(cfg))
    run_info = {"world_size": 1, "num_clients": num_clients, "test_sets": list(test_sets),
                "corrupted_clients": [num_clients - 1], "wall_s": 1.0}
    if finished:
        run_info["finished"] = "2025-01-01T00:00:00"
    run_info.update(info or {})
    (path / "run.json").write_text(json.dumps(run_info))
    out = []
    for t in range(rounds if lines is None else lines):
        metrics = {}
        for s in test_sets:
            b = clean[t] if s == "clean" else corrupted[t]
            metrics[s] = {"bacc": b, "auc": b + (0.1 if s == "clean" else 0.05), "acc": b, "f1": b}
        weights = [float(c + 1 + t) for c in range(num_clients)]
        out.append(json.dumps({"round": t, "algorithm": algorithm, "metrics": metrics,
                               "weights": [w / sum(weights) for w in weights], "keep": 0.0, "rho": 0.05,
                               "stats": {}, "train_loss": 1.0, "time_s": 0.1, "elapsed_s": 0.1 * t}))
    (path / "metrics.jsonl").write_text("\n".join(out) + "\n")
    return path


def two_methods(root: Path) -> list[Path]:
    return [make_run(root, f"{alg}-s{seed}", algorithm=alg, seed=seed)
            for alg in ("fedavg", "fedism") for seed in (0, 1)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def refused(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------------ statistics

def test_mean_and_population_std_over_last_rounds_and_seeds(tmp_path):
    runs = two_methods(tmp_path / "runs")
    report(runs, tmp_path / "out", plots=False)
    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "table.csv")}
    assert list(rows) == ["fedavg", "fedism"]
    row = rows["fedism"]
    # clean BACC: 0.5..0.9 and 0.6..1.0 (the zeros of rounds 1-2 are outside the window): 75 ± 15 exactly
    assert float(row["clean_bacc_mean"]) == pytest.approx(75.0, abs=1e-6)
    assert float(row["clean_bacc_std"]) == pytest.approx(15.0, abs=1e-6)
    assert float(row["clean_auc_mean"]) == pytest.approx(85.0, abs=1e-6)
    assert float(row["clean_auc_std"]) == pytest.approx(15.0, abs=1e-6)
    corr = np.array(CORRUPTED[0][2:] + CORRUPTED[1][2:])
    assert float(row["corrupted_bacc_mean"]) == pytest.approx(58.0, abs=1e-6)
    assert float(row["corrupted_bacc_std"]) == pytest.approx(100 * corr.std(), abs=1e-6)
    assert row["num_seeds"] == "2" and row["num_values"] == "10" and row["last_rounds"] == "3 4 5 6 7"
    assert row["seeds"] == "0 1" and row["corrupted_set"] == "gaussian_3"


def test_avg_and_gap_are_element_wise(tmp_path):
    report(two_methods(tmp_path / "runs"), tmp_path / "out", plots=False)
    row = read_csv(tmp_path / "out" / "table.csv")[0]
    clean = np.array(CLEAN[0][2:] + CLEAN[1][2:])
    corr = np.array(CORRUPTED[0][2:] + CORRUPTED[1][2:])
    gap = clean - corr  # [.1 .2 .2 .1 .3 | .3 .1 0 .3 .1]: mean .17, variance .101 / 10
    assert float(row["gap_bacc_mean"]) == pytest.approx(17.0, abs=1e-6)
    assert float(row["gap_bacc_std"]) == pytest.approx(100 * np.sqrt(0.0101), abs=1e-6)
    assert float(row["gap_bacc_std"]) == pytest.approx(100 * gap.std(), abs=1e-6)
    avg = (clean + corr) / 2
    assert float(row["avg_bacc_mean"]) == pytest.approx(66.5, abs=1e-6)
    assert float(row["avg_bacc_std"]) == pytest.approx(100 * avg.std(), abs=1e-6)
    # element-wise is not the same as combining the two columns' statistics
    assert abs(100 * avg.std() - 50 * (clean.std() + corr.std())) > 0.5
    assert float(row["gap_auc_mean"]) == pytest.approx(17.0 + 5.0, abs=1e-6)  # AUC offsets 0.1 vs 0.05


def test_last_window_option(tmp_path):
    runs = two_methods(tmp_path / "runs")
    report(runs, tmp_path / "out", last=2, plots=False)
    row = read_csv(tmp_path / "out" / "table.csv")[0]
    values = np.array([0.8, 0.9, 0.9, 1.0])
    assert float(row["clean_bacc_mean"]) == pytest.approx(100 * values.mean(), abs=1e-6)
    assert float(row["clean_bacc_std"]) == pytest.approx(100 * values.std(), abs=1e-6)
    assert row["last_rounds"] == "6 7" and row["num_values"] == "4"


def test_markdown_table_and_stdout(tmp_path, capsys):
    runs = two_methods(tmp_path / "runs")
    assert main([*map(str, runs), "--no-plots", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "out" / "report.md").read_text()
    assert printed == md
    assert "## Setting 1: data.source=builtin, benchmark.num_corrupted=1, benchmark.corruption=gaussian, " \
           "benchmark.severity=3" in md
    assert "2 seeds (0, 1) × the last 5 of 7 evaluated rounds (rounds 3, 4, 5, 6, 7 of 7) = 10 values" in md
    assert "Corrupted test set: `gaussian_3` (the training corruption)" in md
    assert "| Method | Clean BACC | Clean AUC | Corrupted BACC | Corrupted AUC | Avg BACC | Avg AUC | Gap BACC | " \
           "Gap AUC |" in md
    assert "| fedavg | 75.00 ± 15.00 | 85.00 ± 15.00 | 58.00 ± " in md
    assert md.index("| fedavg |") < md.index("| fedism |")


def test_methods_with_different_seeds_get_a_seeds_column(tmp_path):
    runs = [*two_methods(tmp_path / "runs"), make_run(tmp_path / "runs", "fedism-s2", algorithm="fedism", seed=2)]
    markdown, _ = report(runs, tmp_path / "out", plots=False)
    assert "the seeds in the Seeds column × the last 5 of 7 evaluated rounds" in markdown
    assert "| Method | Seeds | Clean BACC |" in markdown
    assert "| fedavg | 0, 1 | 75.00 ± 15.00 |" in markdown and "| fedism | 0, 1, 2 |" in markdown


def test_nan_auc_is_shown_as_na(tmp_path):
    runs = [make_run(tmp_path, f"s{s}", seed=s, clean=[float("nan")] * 7) for s in (0, 1)]
    markdown, _ = report(runs, tmp_path / "out", plots=False)
    assert "| fedavg | n/a | n/a |" in markdown


# -------------------------------------------------------------------------------------------------- grouping

def test_methods_and_settings(tmp_path):
    runs = []
    for nc in (1, 2):
        for seed in (0, 1):
            runs.append(make_run(tmp_path, f"fedavg-c{nc}-s{seed}", seed=seed, config={"benchmark.num_corrupted": nc}))
            runs.append(make_run(tmp_path, f"fedism-c{nc}-s{seed}", algorithm="fedism", seed=seed,
                                 config={"benchmark.num_corrupted": nc, "data.cache_dir": f"/tmp/c{seed}"}))
            runs.append(make_run(tmp_path, f"afl-c{nc}-s{seed}", algorithm="afl", seed=seed,
                                 config={"benchmark.num_corrupted": nc, "algorithm.variant": "minimax"}))
            runs.append(make_run(tmp_path, f"sam-c{nc}-s{seed}", seed=seed,
                                 config={"benchmark.num_corrupted": nc, "train.local_optimizer": "sam"}))
            runs.append(make_run(tmp_path, f"gsam-c{nc}-s{seed}", algorithm="fedism", seed=seed + 10,
                                 config={"benchmark.num_corrupted": nc, "train.local_optimizer": "gsam"}))
    report(runs, tmp_path / "out", plots=False)
    rows = read_csv(tmp_path / "out" / "table.csv")
    assert [(r["setting"], r["benchmark.num_corrupted"], r["method"]) for r in rows] == [
        (s, nc, m) for s, nc in (("1", "1"), ("2", "2"))
        for m in ("fedavg", "fedavg + sam", "afl (minimax)", "fedism")]
    # fedism with gsam (its default optimizer) is plain fedism: 4 seeds; data.cache_dir splits nothing
    assert [r["seeds"] for r in rows if r["method"] == "fedism"] == ["0 1 10 11"] * 2
    assert "data.cache_dir" not in rows[0]


def test_differing_key_and_group_by_name_the_setting(tmp_path):
    runs = [make_run(tmp_path, f"lr{lr}-s{s}", seed=s, config={"train.lr": lr}) for lr in (0.001, 0.01) for s in (0, 1)]
    markdown, _ = report(runs, tmp_path / "out", group_by=["model.width"], plots=False)
    assert markdown.count("## Setting") == 2
    assert "benchmark.severity=3, train.lr=0.001, model.width=16\n" in markdown
    assert "## Setting 2: " in markdown and "train.lr=0.01, model.width=16" in markdown
    rows = read_csv(tmp_path / "out" / "table.csv")
    assert [r["train.lr"] for r in rows] == ["0.001", "0.01"] and rows[0]["model.width"] == "16"


def test_group_by_rounds_separates_what_would_be_refused(tmp_path):
    runs = [make_run(tmp_path, "a", rounds=7), make_run(tmp_path, "b", rounds=6, clean=CLEAN[0][1:],
                                                       corrupted=CORRUPTED[0][1:])]
    markdown, _ = report(runs, tmp_path / "out", group_by=["run.rounds"], plots=False)
    assert markdown.count("## Setting") == 2


def test_corrupted_set_falls_back_to_first_non_clean(tmp_path):
    runs = [make_run(tmp_path, f"s{s}", seed=s, test_sets=("clean", "blur_2", "noise_4")) for s in (0, 1)]
    markdown, _ = report(runs, tmp_path / "out", plots=False)
    assert "Corrupted test set: `blur_2` (the first non-clean test set; no test set matches the training " \
           "corruption)" in markdown


def test_corrupted_clients_from_run_json_else_manifest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Manifest(2, ["a", "b"], (8, 8, 1), [ShardEntry("client_000.h5", 4), ShardEntry("client_001.h5", 4, {
        "kind": "gaussian", "severity": 3}), ShardEntry("client_002.h5", 4)],
             [ShardEntry("test_clean.h5", 4, name="clean")]).write(data)
    with_list = make_run(tmp_path, "a", info={"corrupted_clients": [0, 2]})
    without = make_run(tmp_path, "b", info={"data_dir": str(data)})
    json_info = json.loads((without / "run.json").read_text())
    del json_info["corrupted_clients"]
    (without / "run.json").write_text(json.dumps(json_info))
    assert corrupted_clients(load_run(with_list)) == [0, 2]
    assert corrupted_clients(load_run(without)) == [1]


def test_optional_fields_absent_and_present(tmp_path):
    """Lines without weights give no heat map; extra fields (gap, clients, confusion) are ignored."""
    runs = two_methods(tmp_path / "runs")
    for run in runs[:2]:  # fedavg: no weights, but the new optional fields
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            del line["weights"]
            line["gap"] = {"gaussian_3": {"bacc": 0.1}}
            line["clients"] = {"bacc": [0.5] * 4, "acc": [0.5] * 4}
            line["metrics"]["clean"]["confusion"] = [[1, 0], [0, 1]]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    _, files = report(runs, tmp_path / "out")
    names = [f.name for f in files]
    assert not any(n.startswith("weights_") and n.endswith("_fedavg.png") for n in names)
    assert any(n.startswith("weights_") and n.endswith("_fedism.png") for n in names)


# -------------------------------------------------------------------------------------------------- refusals

def test_refuses_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "is not a run directory (no config.toml or run.json)" in refused(capsys, [tmp_path / "empty"])
    assert "is not a run directory (no such directory)" in refused(capsys, [tmp_path / "nowhere"])
    bad = make_run(tmp_path, "bad")
    (bad / "metrics.jsonl").write_text("{not json\n")
    assert "metrics.jsonl: line 1 is not valid JSON" in refused(capsys, [bad])


def test_refuses_incomplete_runs(tmp_path, capsys):
    running = make_run(tmp_path, "running", finished=False)
    assert "is an incomplete run: run.json has no 'finished'" in refused(capsys, [running])
    short = make_run(tmp_path, "short", lines=5)
    assert "is an incomplete run: 5 evaluated round(s) in metrics.jsonl, 7 expected (run.rounds = 7, " \
           "eval.every = 1)" in refused(capsys, [short])
    every = make_run(tmp_path, "every", lines=3, config={"eval.every": 2})  # needs ceil(7 / 2) = 4
    assert "3 evaluated round(s) in metrics.jsonl, 4 expected" in refused(capsys, [every])


def test_refuses_different_rounds_in_a_setting(tmp_path, capsys):
    a = make_run(tmp_path, "a", rounds=7)
    b = make_run(tmp_path, "b", algorithm="fedism", rounds=6, clean=CLEAN[0][1:], corrupted=CORRUPTED[0][1:])
    err = refused(capsys, [a, b])
    assert "have different numbers of rounds" in err and "add --group-by run.rounds" in err


def test_refuses_different_test_sets(tmp_path, capsys):
    a = make_run(tmp_path, "a", seed=0)
    b = make_run(tmp_path, "b", seed=1, test_sets=("clean", "gaussian_3", "gaussian_5"),
                 config={"benchmark.test_severities": [3, 5]})
    err = refused(capsys, [a, b])
    assert "have different test sets" in err and "clean, gaussian_3, gaussian_5" in err


def test_refuses_the_same_seed_twice(tmp_path, capsys):
    a, b = make_run(tmp_path, "a", seed=3), make_run(tmp_path, "b", seed=3)
    assert "the same seed twice in fedavg, setting data.source=builtin" in (err := refused(capsys, [a, b]))
    assert f"{a} and {b} both have run.seed = 3" in err


def test_refuses_fewer_rounds_than_last(tmp_path, capsys):
    run = make_run(tmp_path, "a", rounds=3, clean=[0.5] * 3, corrupted=[0.4] * 3)
    assert "only 3 evaluated round(s), fewer than --last 5" in refused(capsys, [run])
    assert main([str(run), "--last", "3", "--no-plots", "--out", str(tmp_path / "out")]) == 0


def test_refuses_bad_group_by_and_missing_clean_set(tmp_path, capsys):
    run = make_run(tmp_path, "a")
    assert "--group-by model.nope: no run has this config key" in refused(capsys, [run, "--group-by", "model.nope"])
    assert "expected section.key" in refused(capsys, [run, "--group-by", "width"])
    no_clean = make_run(tmp_path, "b", test_sets=("gaussian_3", "gaussian_5"))
    assert "needs a 'clean' and a corrupted test set" in refused(capsys, [no_clean])


# ------------------------------------------------------------------------------------------------- the files

def test_csv_content(tmp_path):
    report(two_methods(tmp_path / "runs"), tmp_path / "out", plots=False)
    rows = read_csv(tmp_path / "out" / "table.csv")
    stats = [f"{c}_{m}_{s}" for c in ("clean", "corrupted", "avg", "gap") for m in ("bacc", "auc")
             for s in ("mean", "std")]
    assert list(rows[0]) == ["setting", "method", "data.source", "benchmark.num_corrupted", "benchmark.corruption",
                             "benchmark.severity", "corrupted_set", "seeds", "num_seeds", "last_rounds",
                             "num_values", *stats, "sharpness_ratio_mean", "sharpness_ratio_std"]
    assert len(rows) == 2 and {r["setting"] for r in rows} == {"1"}
    assert rows[0]["data.source"] == "builtin" and rows[0]["benchmark.severity"] == "3"
    for r in rows:
        assert all(np.isfinite(float(r[c])) for c in stats)


def test_the_three_kinds_of_png(tmp_path):
    _, files = report(two_methods(tmp_path / "runs"), tmp_path / "out")
    pngs = sorted(f.name for f in files if f.suffix == ".png")
    assert len(pngs) == 4
    assert sum(n.startswith("bacc_rounds_s1_") for n in pngs) == 1
    assert sum(n.startswith("gap_s1_") for n in pngs) == 1
    assert sum(n.startswith("weights_s1_") for n in pngs) == 2
    for name in pngs:
        path = tmp_path / "out" / name
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    md = (tmp_path / "out" / "report.md").read_text()
    assert all(f"({n})" in md for n in pngs)


# ---------------------------------------------------------------------------------------------- real runs

def test_report_on_real_runs(tmp_path, capsys):
    """python -m hpcfl.run for 2 methods x 2 seeds on a tiny benchmark (one process: tests/run_many.py), then the
    report."""
    tiny = ["run.rounds=5", "benchmark.num_train=200", "benchmark.num_test=100", "benchmark.image_size=16",
            *FROM_SCRATCH, "model.width=4"]
    jobs = [[*[f"--set={s}" for s in [*tiny, f"algorithm.name={alg}", f"run.seed={seed}",  # a cache per method
                                      f"data.cache_dir={tmp_path / ('data-' + alg)}"]],
             "--out", str(tmp_path / f"{alg}-s{seed}")] for seed in (0, 1) for alg in ("fedavg", "fedism")]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(REPO / "tests" / "run_many.py"), str(tmp_path / "jobs.json")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    dirs = [str(tmp_path / f"{alg}-s{seed}") for alg in ("fedism", "fedavg") for seed in (0, 1)]
    assert main([*dirs, "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "## Setting 1: data.source=builtin, benchmark.num_corrupted=4" in printed  # cache dirs split nothing
    assert "2 seeds (0, 1) × the last 5 of 5 evaluated rounds" in printed
    assert printed.index("| fedavg |") < printed.index("| fedism |")
    rows = read_csv(tmp_path / "report" / "table.csv")
    assert [r["method"] for r in rows] == ["fedavg", "fedism"]
    assert all(0 <= float(r["clean_bacc_mean"]) <= 100 for r in rows)
    # FedISM measures sharpness: its row has the corrupted ÷ clean ratio, FedAvg's has none, and a plot shows it
    assert rows[0]["sharpness_ratio_mean"] == "" and float(rows[1]["sharpness_ratio_mean"]) > 0
    assert "| Sharpness ratio |" in printed.splitlines()[printed.splitlines().index(
        next(line for line in printed.splitlines() if line.startswith("| Method")))]
    assert len(list((tmp_path / "report").glob("*.png"))) == 5
    assert len(list((tmp_path / "report").glob("sharpness_*.png"))) == 1
    # a refusal through the command line: one message, exit code 2, no traceback
    res = subprocess.run([sys.executable, "-m", "hpcfl.report", dirs[0], str(tmp_path / "data-fedavg")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "is not a run directory" in res.stderr and "Traceback" not in res.stderr


def test_a_sweep_root_stands_for_its_run_directories(tmp_path):

    root = tmp_path / "sweep"
    for name in ("fedavg-s0", "fedism-s0"):
        (root / name).mkdir(parents=True)
        (root / name / "config.toml").write_text("")
    (root / "logs").mkdir()
    (root / "cells.tsv").write_text("")
    assert expand_sweep_roots([root]) == [root / "fedavg-s0", root / "fedism-s0"]
    assert expand_sweep_roots([root / "fedavg-s0"]) == [root / "fedavg-s0"]


def test_report_gives_the_corrupted_clients_aggregation_weight(tmp_path):
    runs = two_methods(tmp_path / "runs")
    markdown, _ = report(runs, tmp_path / "out", plots=False)
    # make_run's weights: client c gets (c + 1 + t) / (10 + 4t) in round t; client 3 is the corrupted one
    per_round = np.array([100 * (4 + t) / (10 + 4 * t) for t in range(7)] * 2)
    expected = f"{per_round.mean():.2f} ± {per_round.std():.2f}"
    line = next(x for x in markdown.splitlines() if x.startswith("Total aggregation weight"))
    assert "corrupted clients [3]" in line and f"fedavg {expected}" in line and f"fedism {expected}" in line
    assert "share of the training samples" not in line  # no manifest to read the shard sizes from


def test_the_sharpness_ratio_by_hand(tmp_path):
    """corrupted clients' mean sharpness ÷ the clean ones', per round, from the metrics lines."""
    from hpcfl.report.tables import sharpness_ratio

    run = load_run(make_run(tmp_path, "r", info={"corrupted_clients": [2, 3]}))
    run.lines = [{"round": 0, "stats": {"sharpness": [1.0, 3.0, 4.0, 6.0]}}, {"round": 1, "stats": {}}]
    ratio = sharpness_ratio(run)
    assert ratio[0] == pytest.approx(5.0 / 2.0) and np.isnan(ratio[1])
