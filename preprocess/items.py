"""The vocabulary of the real-data preprocessors: what a data set module builds (a :class:`Plan` of
:class:`Item` s) and what the pipeline works in (a :class:`Job` per shard group), with their errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcfl.data.shards import Manifest
from hpcfl.errors import UsageError

CHUNK = 16  # items per worker task; fixed, so that the output never depends on --workers
MAX_REASON = 300  # characters of a skip reason kept in skipped.csv


class PipelineError(UsageError):
    """Bad input to a preprocessor (arguments, folders, CSVs); the message names the file or option."""


class SkipItem(Exception):
    """Raised by a loader when an item cannot be used; the message is the reason written to skipped.csv."""


class StopRequested(RuntimeError):
    """Raised after ``$HPCFL_PREPROCESS_STOP_AFTER`` shard groups, to test resuming."""


@dataclass(frozen=True)
class Item:
    """One image: its id, its class, and where it comes from (a path for ``Plan.loader``, or a picklable
    zero-argument callable returning the image)."""
    id: str
    label: int
    source: object


@dataclass(frozen=True)
class Corruption:
    kind: str
    severity: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.severity}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity}


@dataclass
class Plan:
    """Everything that decides the output. ``loader(source) -> uint8 [H, W, C]`` must be picklable (a module
    function or a ``functools.partial`` of one) and raise :class:`SkipItem` (or anything) for a bad item."""
    dataset: str
    class_names: list[str]
    image_shape: tuple[int, int, int]
    loader: Callable | None
    train: list[Item]
    parts: list[np.ndarray]  # client i holds train[parts[i]], in that order
    corrupted_clients: list[int]
    corruption: Corruption | None  # of the corrupted clients
    test: list[Item]
    test_corruptions: list[Corruption]
    corruption_seed: int = 0
    client_names: list[str] | None = None  # e.g. the ISIC centres; recorded per client
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, where, reason) found up front
    compression: str | None = None
    made_by: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # more manifest fields


@dataclass
class Output:
    file: str
    corruption: Corruption | None
    attrs: dict


@dataclass
class Job:
    """A group of shards made from the same items: one client, or the test set and its corrupted copies."""
    key: str
    where: str  # the 'where' column of skipped.csv
    items: list[Item]
    outputs: list[Output]


@dataclass
class Result:
    out_dir: Path
    manifest: Manifest
    skipped: list[tuple[str, str, str]]
    written: list[str]
    reused: list[str]
