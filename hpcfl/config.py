"""Run configuration: TOML -> validated dataclasses.

Every section of the TOML file maps to one dataclass below; every key to one field. Unknown sections or
keys, wrong types and out-of-range values are refused with a ``ConfigError`` naming the key, so a typo never
silently falls back to a default. ``--set section.key=value`` overrides are parsed as TOML values
(``--set train.lr=1e-3``, ``--set model.name=resnet18``; a bare word is taken as a string).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


from hpcfl.algorithms import AlgorithmOptions, algorithm_class, available, options_of
from hpcfl.data.corrupt import KINDS as CORRUPTION_KINDS
from hpcfl.models import MODEL_NAMES
from hpcfl.options import ConfigError, check_value, default_of, option, same_declaration


@dataclass
class RunConfig:
    seed: int = option(0, lo=0, doc="base seed of every random stream (model init, shuffling, augmentation)")
    rounds: int = option(20, lo=1, doc="communication rounds T")
    out: str = option("runs/default", doc="run directory (config, metrics, logs, checkpoints, final model: docs/outputs.md)")
    torch_threads: int = option(1, lo=1, doc="torch intra-op threads per rank; equal numbers across ranks need equal values")
    device: str = option("cpu", choices=("cpu", "cuda", "auto"), doc="client ranks' device; 'auto' = cuda when available")
    round_timeout_s: float = option(0.0, lo=0.0, doc="end the job when one round takes longer than this (a stuck "
                                                       "rank or collective); 0: adapt to the run (5 x the slowest "
                                                       "round so far, at least run.watchdog_floor_s)")
    watchdog_floor_s: float = option(300.0, lo=0.0, lo_open=True,
                                     doc="the adaptive round limit's floor (4 x this for the first round of an "
                                         "attempt, which pays for warm-up)")
    on_nonfinite: str = option("abort", choices=("abort", "skip"),
                             doc="a client with non-finite parameters, loss or statistics: end the job, or leave the "
                                 "client out of that round")
    checkpoint_every: int = option(5, lo=0, doc="checkpoint every m rounds (0: only at the end and on a stop signal)")
    aggregation: str = option("exact", choices=("exact", "float32"),
                            doc="'exact': fixed-point sum, equal for any world size; 'float32': half the bytes")


@dataclass
class DataConfig:
    source: str = option("builtin", doc="'builtin' (the generated benchmark, built on first use) or a shard directory")
    cache_dir: str = option("data", doc="where the built-in benchmark's shards are written")
    val_fraction: float = option(0.0, lo=0.0, hi=0.5, doc="share of each client's shard held out for per-client "
                                                         "metrics (0: none)")




@dataclass
class BenchmarkConfig:
    """The built-in quality-shift benchmark (preprocess/synthetic.py); used when data.source = 'builtin'."""

    num_clients: int = option(20, lo=1, doc="clients (hospitals) N")
    num_corrupted: int = option(4, lo=0, doc="the last num_corrupted clients get corrupted training images")
    num_train: int = option(4000, lo=1, doc="training images, split over the clients")
    num_test: int = option(1000, lo=1, doc="images of the (global) test set")
    image_size: int = option(32, lo=16, hi=512, doc="side of the square grayscale images, in pixels")
    class_prior: list = option([0.022, 0.205, 0.13, 0.215, 0.428], doc="class frequencies (ICH's, §6.1)")
    alpha: float = option(1.0, lo=0.0, lo_open=True, doc="Dirichlet concentration of the partition (§6.4)")
    corruption: str = option("gaussian", choices=CORRUPTION_KINDS,
                           doc="quality shift of the corrupted clients and test copies (docs/corruptions.md)")
    severity: int = option(2, lo=1, hi=5,
                         doc="corruption severity 1..5 of the corrupted clients (gaussian 2: sigma 0.12; the paper uses 3, sigma 0.18; docs/results.md says why 2)")
    test_severities: list = option([2], doc="severities 1..5 of the corrupted test copies (test sets <corruption>_<s>)")
    seed: int = option(2024, lo=0, doc="seed of images, partition and corruption")


@dataclass
class ModelConfig:
    name: str = option("cnn", choices=MODEL_NAMES,
                       doc="cnn: the small CNN; resnet8: a narrow BatchNorm ResNet (CPU runs, 32-64 px); or a "
                           "torchvision backbone with a new head")
    width: int = option(16, lo=1, doc="channels of cnn's and resnet8's first block (doubles per block)")
    cnn_norm: str = option("group", choices=("group", "batch"),
                           doc="normalisation layers of the small CNN (resnet8 and torchvision backbones keep "
                               "BatchNorm); docs/results.md says why group")
    pretrained_path: str = option("", doc="a local state_dict file with pretrained weights (ImageNet's for a "
                                          "torchvision backbone; never downloaded), or 'builtin': the built-in "
                                          "pretrained start, made on first use ([pretrain], hpcfl/pretrain.py)")


@dataclass
class PretrainConfig:
    """The built-in pretrained start (``model.pretrained_path = "builtin"``): a model trained centrally, once, on a
    pool of clean rendered images no client or test set holds (hpcfl/pretrain.py)."""

    images: int = option(6000, lo=1, doc="images of the pool (every class equally often)")
    epochs: int = option(4, lo=1, doc="epochs over the pool")
    lr: float = option(2e-3, lo=0.0, lo_open=True, doc="Adam's learning rate (weight decay as train.weight_decay's default)")
    batch_size: int = option(32, lo=1, doc="mini-batch size")
    seed: int = option(7, lo=0, doc="seed of the pool's images, the initial model and the shuffling")


@dataclass
class TrainConfig:
    optimizer: str = option("adam", choices=("adam", "sgd"), doc="local optimizer, re-created every round")
    lr: float = option(2e-3, lo=0.0, lo_open=True, doc="learning rate (constant; the reference's 3e-4 is for a pretrained ResNet-18: configs/reference.toml)")
    weight_decay: float = option(5e-4, lo=0.0, doc="L2 weight decay inside the optimizer (coupled)")
    momentum: float = option(0.9, lo=0.0, hi=1.0, doc="SGD only")
    batch_size: int = option(16, lo=1, doc="local mini-batch size (the last partial batch is kept; a 1-sample rest joins the batch before)")
    local_epochs: int = option(1, lo=1, doc="local epochs per round")
    logit_adjust: bool = option(True, doc="logit-adjusted CE with the client's own class prior (§3.3)")
    tau: float = option(1.0, lo=0.0, doc="logit-adjustment temperature")
    augment: bool = option(True, doc="random affine (±10°, 2% shift) + horizontal flip (§6.7)")
    local_optimizer: str = option("auto", choices=("auto", "plain", "sam", "gsam"),
                                doc="'auto': gsam for fedism/fedism_plus, plain for the others (as the reference)")
    gsam_alpha: float = option(0.1, lo=0.0, doc="GSAM's α (surrogate-gap ascent)")
    amp: str = option("off", choices=("off", "bf16"),
                    doc="bf16 autocast of local training's forward passes (a GPU option; statistics and evaluation stay float32)")
    channels_last: bool = option(True, doc="model and batches in channels_last memory format: 1.4x faster training of the "
                                             "small CNN on the CPU than NCHW, which rounds differently (docs/performance.md)")
    compile: str = option("off", choices=("off", "default", "reduce-overhead"),
                        doc="torch.compile the model for local training; 'reduce-overhead' adds CUDA graphs against launch overhead at small batches")


def _algorithm_section() -> type:
    """[algorithm]: the keys every method has, then each registered method's own keys (hpcfl/algorithms/), in
    listing order. A key several methods declare (``q``) must be declared alike; its meanings are joined."""
    fields = {f.name: f for f in dataclasses.fields(AlgorithmOptions)}
    docs = {name: [f.metadata["doc"]] for name, f in fields.items()}
    variants: list[str] = []
    for name in available():
        cls = algorithm_class(name)
        variants += [v for v in cls.variants if v not in variants]
        for f in dataclasses.fields(cls.Options):
            if f.name not in fields:
                fields[f.name], docs[f.name] = f, []
            elif not same_declaration(fields[f.name], f):
                raise TypeError(f"algorithm.{f.name}: {name} declares it unlike another method does")
            if f.metadata["doc"] not in docs[f.name]:
                docs[f.name].append(f.metadata["doc"])
    choices = {"name": tuple(available()), "variant": tuple(variants)}
    specs = []
    for key, f in fields.items():
        meta = {**f.metadata, "doc": "; ".join(docs[key])}
        if key in choices:
            meta["choices"] = choices[key]
        specs.append((key, type(default_of(f)), option(default_of(f), **{k: meta[k] for k in
                                                                           ("lo", "hi", "lo_open", "choices", "doc")})))
    return dataclasses.make_dataclass(
        "AlgorithmConfig", specs,
        namespace={"__doc__": "The aggregation rule and its hyperparameters (docs/algorithms.md gives every formula). "
                              "Every method's keys are accepted whatever the method; each method reads its own."})


AlgorithmConfig = _algorithm_section()


@dataclass
class EvalConfig:
    every: int = option(1, lo=1, doc="evaluate every k rounds (and always after the last)")
    batch_size: int = option(256, lo=1, doc="evaluation batch size")
    placement: str = option("auto", choices=("auto", "server", "clients"),
                            doc="under MPI, who tests the global model on the test sets: 'server' (on its CPU, "
                                "overlapped with the next round's training: free when the server has a core of its "
                                "own), 'clients' (each client rank its share of the rows, on its device, right after "
                                "the aggregation, gathered to the server), 'auto' = 'clients' when client ranks use "
                                "a GPU or the ranks on the server's node (run.torch_threads each) outnumber its "
                                "cores; on the CPU the metrics are the same bits either way")


@dataclass
class DebugConfig:
    fail_at: str = option("", doc="'RANK:ROUND[:PHASE]' raises an error on that rank in that round and phase (tests)")
    hang_at: str = option("", doc="'RANK:ROUND' makes that rank hang in local training of that round (watchdog tests)")
    nan_at: str = option("", doc="'CLIENT:ROUND' makes that client's trained model NaN in that round (tests)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def local_optimizer(self) -> str:
        """The local optimizer actually used ('auto' resolved per algorithm)."""
        if self.train.local_optimizer != "auto":
            return self.train.local_optimizer
        return algorithm_class(self.algorithm.name).default_local_optimizer

    def digest(self) -> str:
        """A hash of everything that determines the run's numbers (not where it is written, nor [debug]):
        stored in checkpoints, so a checkpoint is never continued under another config by mistake."""
        d = {sec: {k: v for k, v in table.items() if (sec, k) not in RESUME_NEUTRAL}
             for sec, table in self.to_dict().items() if sec != "debug"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- validation

def _cross_checks(cfg: Config) -> None:
    b = cfg.benchmark
    if b.num_corrupted >= b.num_clients:
        raise ConfigError(
            f"benchmark.num_corrupted: {b.num_corrupted} must be smaller than benchmark.num_clients ({b.num_clients})")
    if b.num_train < b.num_clients:
        raise ConfigError(f"benchmark.num_train: {b.num_train} is fewer than one image per client ({b.num_clients})")
    if len(b.class_prior) < 2 or any(type(p) not in (int, float) or not math.isfinite(p) or p <= 0
                                     for p in b.class_prior):
        raise ConfigError("benchmark.class_prior: needs at least 2 positive numbers")
    if any(type(s) is not int or not 1 <= s <= 5 for s in b.test_severities):
        raise ConfigError(f"benchmark.test_severities: {b.test_severities!r} must be integers in 1..5")
    algorithm_class(cfg.algorithm.name).check_options(options_of(cfg.algorithm.name, cfg.algorithm))
    if cfg.model.pretrained_path and cfg.model.pretrained_path != "builtin":
        if not Path(cfg.model.pretrained_path).is_file():
            raise ConfigError(f"model.pretrained_path: no such file {cfg.model.pretrained_path}")
    phases = ("data", "broadcast", "statistics", "local training", "cosines", "weights", "aggregation",
              "evaluation", "checkpoint")
    if cfg.debug.fail_at:
        parts = cfg.debug.fail_at.split(":")
        if not (2 <= len(parts) <= 3 and all(p.strip().isdigit() for p in parts[:2])
                and (len(parts) == 2 or parts[2] in phases)):
            raise ConfigError(f"debug.fail_at: {cfg.debug.fail_at!r} must look like 'RANK:ROUND' or "
                              f"'RANK:ROUND:PHASE', PHASE one of {', '.join(phases)}")
    for key in ("hang_at", "nan_at"):
        value = getattr(cfg.debug, key)
        parts = value.split(":")
        if value and (len(parts) != 2 or not all(p.strip().isdigit() for p in parts)):
            raise ConfigError(f"debug.{key}: {value!r} must look like 'A:B' (two integers), e.g. '2:1'")


def from_dict(raw: dict) -> Config:
    """Build a validated ``Config`` from a nested dict (as parsed from TOML)."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a table of sections")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for sec_name, sec_val in raw.items():
        if sec_name not in sections:
            raise ConfigError(f"unknown section [{sec_name}] (known: {', '.join(sections)})")
        if not isinstance(sec_val, dict):
            raise ConfigError(f"{sec_name}: expected a table [{sec_name}], got {type(sec_val).__name__}")
        cls = sections[sec_name].default_factory
        fields = {f.name: f for f in dataclasses.fields(cls)}
        vals = {}
        for key, value in sec_val.items():
            if key not in fields:
                raise ConfigError(f"unknown key {sec_name}.{key} (known in [{sec_name}]: {', '.join(fields)})")
            vals[key] = check_value(f"{sec_name}.{key}", value, fields[key])
        kwargs[sec_name] = cls(**vals)
    cfg = Config(**kwargs)
    _cross_checks(cfg)
    return cfg


# Keys that may change between a run and its resumption without changing its numbers.
RESUME_NEUTRAL = {("run", "out"), ("run", "checkpoint_every"), ("run", "round_timeout_s"), ("run", "watchdog_floor_s"),
                  ("eval", "placement")}


def config_differences(old: Config, new: Config) -> list[str]:
    """'section.key: old -> new' for every key that differs, except those a resume may change (and [debug])."""
    out = []
    a, b = old.to_dict(), new.to_dict()
    for sec in a:
        if sec == "debug":
            continue
        for key in a[sec]:
            if (sec, key) not in RESUME_NEUTRAL and a[sec][key] != b[sec][key]:
                out.append(f"{sec}.{key}: {a[sec][key]!r} -> {b[sec][key]!r}")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=1e-3'`` -> (['train', 'lr'], 0.001). The value is read as TOML; a bare word as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, _, value = text.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. train.lr")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return path, parsed


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_bytes().decode("utf-8-sig"))  # a byte-order mark from an editor is fine
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot be read ({e.strerror})") from None
    for text in overrides:
        (sec, key), value = parse_override(text)
        if isinstance(value, str):
            toml_string(value)  # refuses what a run directory's config.toml could not hold
        raw.setdefault(sec, {})
        if not isinstance(raw[sec], dict):
            raise ConfigError(f"--set {text!r}: {sec} is not a section")
        raw[sec][key] = value
    return from_dict(raw)


def toml_string(text: str) -> str:
    """A TOML basic string: UTF-8 as it is; quote, backslash and control characters escaped. (JSON's escapes are
    not TOML's: it writes characters outside the BMP as surrogate pairs, which TOML refuses.)"""
    def esc(ch: str) -> str:
        if ch in '"\\':
            return "\\" + ch
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"\\u{ord(ch):04X}"
        if 0xD800 <= ord(ch) <= 0xDFFF:  # a lone surrogate (an undecodable byte in a path) has no UTF-8 form
            raise ConfigError(f"{text!r}: holds bytes that are not UTF-8, which a config file cannot store")
        return ch
    return '"' + "".join(esc(ch) for ch in text) + '"'


def dumps_toml(d: dict) -> str:
    """Minimal TOML writer for our two-level config (strings, numbers, booleans, flat lists)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return toml_string(v)
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return str(v)

    out = []
    for sec, table in d.items():
        out.append(f"[{sec}]")
        out.extend(f"{k} = {val(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def reference_markdown() -> str:
    """docs/configuration.md: every section and key with its default, valid values and meaning."""
    lines = ["# Configuration reference", "",
             "Generated from `hpcfl/config.py` by `python -m hpcfl.config > docs/configuration.md` "
             "(a test keeps it current).", "",
             "Config files are TOML; every key is optional and defaults as below. On the command line, "
             "`--set section.key=value` overrides one key (the value is read as TOML; a bare word as a string).", ""]
    for sec in dataclasses.fields(Config):
        cls = sec.default_factory
        lines += [f"## [{sec.name}]", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += [cls.__doc__.strip(), ""]
        lines += ["| key | default | valid | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = default_of(f)
            if m.get("choices"):
                valid = " \\| ".join(f"`{c}`" for c in m["choices"])
            else:
                lo = "" if m.get("lo") is None else f"{'>' if m['lo_open'] else '≥'} {m['lo']}"
                hi = "" if m.get("hi") is None else f"≤ {m['hi']}"
                valid = ", ".join(x for x in (lo, hi) if x) or type(default).__name__
            shown = json.dumps(default) if not isinstance(default, bool) else str(default).lower()
            lines.append(f"| `{f.name}` | `{shown}` | {valid} | {m.get('doc', '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
