"""What a run writes on the server: metrics.jsonl, metrics.csv, optional TensorBoard events, the progress line;
and the server's record of the run, which completes each metrics line with the test-set evaluation.

metrics.jsonl and metrics.csv are rewritten atomically at every evaluated round (a reader never sees half a
line); TensorBoard's event files are append-only logs, written only when the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from hpcfl.atomic import write_text
from hpcfl.metrics import classification_metrics, gaps, predict_proba

log = logging.getLogger("hpcfl")
SCALAR_METRICS = ("bacc", "auc", "acc", "f1", "f1_weighted", "auc_weighted")


def flat_row(line: dict) -> dict:
    """One metrics.jsonl line as a flat CSV row (scalars only; weights and statistics stay in the JSON)."""
    row = {"round": line["round"], "algorithm": line["algorithm"]}
    for name, m in line["metrics"].items():
        row.update({f"{name}_{k}": m[k] for k in SCALAR_METRICS if k in m})
    for name, g in line.get("gap", {}).items():
        row.update({f"gap_{name}_{k}": v for k, v in g.items()})
    for metric, summary in line.get("client_summary", {}).items():
        row.update({f"clients_{metric}_{k}": v for k, v in summary.items()})
    row.update({k: line[k] for k in ("train_loss", "rho", "time_s", "elapsed_s") if k in line})
    return row


class RunLog:
    def __init__(self, out_dir: Path, lines: list[dict] | None = None):
        """``lines``: a resumed run's history from its checkpoint, written back at once (metrics.jsonl may have been
        damaged, or hold rounds after the checkpoint that the resumed run repeats)."""
        self.out_dir = out_dir
        self.lines: list[dict] = list(lines or [])
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            pass
        if self.lines:
            self._write()

    def add(self, line: dict) -> None:
        self.lines.append(line)
        self._write()
        if self.tb is not None:
            for key, value in flat_row(line).items():
                if isinstance(value, float) and math.isfinite(value):
                    self.tb.add_scalar(key, value, line["round"])
            self.tb.flush()

    def _write(self) -> None:
        write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in self.lines))
        rows = [flat_row(x) for x in self.lines]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.out_dir / "metrics.csv", buf.getvalue())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_text(line: dict, rounds: int) -> str:
    """round, train loss, BACC per test set and the clean-corrupted gap, in one line."""
    parts = [f"round {line['round'] + 1}/{rounds}", f"loss {line['train_loss']:.4f}"]
    parts += [f"{name} bacc {m['bacc']:.3f}" for name, m in line["metrics"].items()]
    parts += [f"gap({name}) {g['bacc']:+.3f}" for name, g in line.get("gap", {}).items()]
    if "client_summary" in line:
        parts.append(f"worst client bacc {line['client_summary']['bacc']['worst']:.3f}")
    return "  ".join(parts) + f"  ({line['time_s']:.1f} s)"


class Progress:
    """Rank 0's progress: a tqdm bar when the console is a terminal (round, loss, BACC, gap in its postfix), else
    one log line per round (batch jobs). The line always goes to the rank's log file."""

    active_bar = False  # read by the console log handler: while a bar is shown, round lines stay off the console

    def __init__(self, rounds: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=rounds, initial=start, unit="round", dynamic_ncols=True)
                Progress.active_bar = True
            except ImportError:
                pass

    def round_done(self, text: str, postfix: str = "") -> None:
        logging.getLogger("hpcfl.progress").info(text)
        if self.bar is not None:
            self.bar.set_postfix_str(postfix or text, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            Progress.active_bar = False


class ServerRecord:
    """The server's record of the run: test-set evaluation, metrics lines, progress. Under MPI the server's
    evaluation of w^{t+1} is deferred to the next round's start, while the clients train (at the latest before a
    checkpoint or at the end); alone, the server evaluates at once. Under eval.placement 'clients' the client
    ranks have tested the model already: ``add`` receives the test sets' probabilities, and only the metrics
    are left for later."""

    def __init__(self, fed, lines: list[dict], start: int):
        self.fed = fed
        self.pending: tuple | None = None  # (w^{t+1} or None, the partial line, the probabilities or None)
        self.runlog = RunLog(fed.out_dir, lines)
        self.progress = Progress(fed.cfg.run.rounds, start, enabled=sys.stderr.isatty())

    def add(self, vec: np.ndarray, line: dict, probabilities: dict[str, np.ndarray] | None = None) -> None:
        self.pending = (None if probabilities is not None else vec.copy(), line, probabilities)
        if self.fed.comm.size == 1 or line["round"] == self.fed.cfg.run.rounds - 1:
            self.catch_up()

    def catch_up(self) -> None:
        """Test the pending model on every test set (unless the client ranks did), complete its metrics line,
        log it."""
        if self.pending is None:
            return
        (vec, partial, probabilities), fed = self.pending, self.fed
        if probabilities is None:
            fed.layout.load_vector(fed.model, vec)
            probabilities = {name: predict_proba(fed.model, images, fed.transform, fed.cfg.eval.batch_size)
                             for name, (images, _) in fed.test_sets.items()}
        results = {name: classification_metrics(labels, probabilities[name])
                   for name, (_, labels) in fed.test_sets.items()}
        line = {"round": partial["round"], "algorithm": partial["algorithm"], "metrics": results,
                "gap": gaps(results), **partial}
        self.runlog.add(line)
        self.progress.round_done(progress_text(line, fed.cfg.run.rounds))
        self.pending = None
