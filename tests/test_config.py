import dataclasses
import tomllib

import pytest

from hpcfl import config
from hpcfl.config import ConfigError
from tests.conftest import REPO


def test_default_toml_is_the_dataclass_defaults_but_its_benchmark_keys():
    """configs/default.toml writes out the defaults, but for the keys it marks "benchmark" (the paper's regime in
    miniature, docs/results.md): neither may drift from the other unnoticed."""
    path = REPO / "configs" / "default.toml"
    marked = [line.split("=")[0].strip() for line in path.read_text().splitlines() if line.endswith("# benchmark")]
    assert marked == ["rounds", "name", "width", "pretrained_path", "lr", "rho"]
    benchmark = config.load(path)
    defaults = config.load(None, ["run.rounds=30", "model.name=resnet8", "model.width=8",
                                  "model.pretrained_path=builtin", "train.lr=0.001", "algorithm.rho=0.0078"])
    assert benchmark == defaults
    assert benchmark != config.Config()


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = config.load(None, ["train.lr=0.01", "benchmark.test_severities=[1, 3]", "model.name=resnet18"])
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert config.load(p) == cfg
    assert cfg.train.lr == 0.01 and cfg.benchmark.test_severities == [1, 3] and cfg.model.name == "resnet18"
    assert cfg.digest() == config.load(p).digest() != config.Config().digest()


@pytest.mark.parametrize("text, message", [
    ("[run]\nrounds = 3\nround = 4\n", "unknown key run.round"),
    ("[runn]\nrounds = 3\n", "unknown section [runn]"),
    ("[run]\nrounds = 'ten'\n", "run.rounds: expected int, got str"),
    ("[run]\nrounds = 2.5\n", "run.rounds: expected int, got float"),
    ("[train]\naugment = 1\n", "train.augment: expected bool, got int"),
    ("[run]\nrounds = true\n", "run.rounds: expected int, got bool"),
    ("[run]\nrounds = 0\n", "run.rounds: 0 is out of range (must be >= 1)"),
    ("[train]\nlr = 0.0\n", "train.lr: 0.0 is out of range (must be > 0.0)"),
    ("[benchmark]\nseverity = 6\n", "benchmark.severity: 6 is out of range (must be <= 5)"),
    ("[model]\nname = 'vgg'\n", "model.name: 'vgg' is not one of"),
    ("[benchmark]\nnum_clients = 4\nnum_corrupted = 4\n", "benchmark.num_corrupted: 4 must be smaller"),
    ("[benchmark]\ntest_severities = [0]\n", "benchmark.test_severities"),
    ("[debug]\nfail_at = 'two'\n", "debug.fail_at"),
    ("run = 3\n", "run: expected a table"),
    ("[run\n", "not valid TOML"),
])
def test_bad_configs_are_refused_by_key(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config.load(p)


def test_overrides_are_typed_and_checked():
    assert config.load(None, ["run.rounds=7"]).run.rounds == 7
    assert config.load(None, ["train.weight_decay=0"]).train.weight_decay == 0.0  # an int is a valid float
    assert config.load(None, ["train.augment=false"]).train.augment is False
    assert config.load(None, ["run.out=runs/x y"]).run.out == "runs/x y"  # bare words are strings
    with pytest.raises(ConfigError, match="run.rounds: expected int, got str"):
        config.load(None, ["run.rounds=many"])
    with pytest.raises(ConfigError, match="section.key"):
        config.load(None, ["rounds=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config.load(None, ["run.rounds"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        config.load(tmp_path / "nope.toml")


def test_every_field_is_declared_with_range_and_meaning():
    """Every config field carries its range metadata (so the validator checks every key) and a meaning."""
    for sec in dataclasses.fields(config.Config):
        for f in dataclasses.fields(sec.default_factory):
            assert "lo" in f.metadata, f"{sec.name}.{f.name} was declared without _opt()"
            assert f.metadata["doc"], f"{sec.name}.{f.name} has no doc"


def test_toml_writer_escapes_strings():
    d = {"run": {"out": 'a "quoted" \\ path'}}
    assert tomllib.loads(config.dumps_toml(d)) == d


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the dataclasses; regenerate with python -m hpcfl.config."""
    assert (REPO / "docs" / "configuration.md").read_text() == config.reference_markdown()


def test_benchmark_corruptions_are_those_of_the_registry():
    from hpcfl.data.corrupt import CORRUPTIONS

    for kind in CORRUPTIONS:
        assert config.load(None, [f"benchmark.corruption={kind}"]).benchmark.corruption == kind
    with pytest.raises(config.ConfigError, match="benchmark.corruption: 'fog' is not one of 'gaussian'"):
        config.load(None, ["benchmark.corruption=fog"])


def test_imports_run_one_way():
    """The simulator never imports the tools above it (data-set preparation, cluster jobs, benchmarks)."""
    import ast

    above = {"preprocess", "jobs", "benchmarks", "tests"}
    for path in sorted((REPO / "hpcfl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & above, (path, names)


def test_reference_config_holds_the_papers_training_settings():
    cfg = config.load(REPO / "configs" / "reference.toml")
    assert (cfg.model.name, cfg.train.lr, cfg.train.batch_size, cfg.run.rounds) == ("resnet18", 3e-4, 32, 300)
    assert (cfg.benchmark.severity, cfg.benchmark.test_severities) == (3, [3])


def test_a_config_file_may_start_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[run]\nrounds = 7\n")
    assert config.load(path).run.rounds == 7
