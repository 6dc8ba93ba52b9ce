"""medmllm.config: YAML + overrides -> typed dataclasses; errors that say what and where."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from medmllm.config import (ConfigError, dump_config, dump_config_yaml, load_config, parse_override,
                            path_field, save_config)


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclass
class Model:
    layers: int
    name: str = "tiny"
    dropout: Optional[float] = None


class Stage(enum.Enum):
    ALIGN = "align"
    SFT = "sft"


@dataclass
class Cfg:
    model: Model
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    precision: Literal["no", "bf16"] = "no"
    compile: bool = False
    stage: Stage = Stage.SFT
    extra: dict = field(default_factory=dict)
    data: Optional[Path] = path_field(None)


def write(tmp_path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_nested_overrides_are_typed(tmp_path):
    p = write(tmp_path, "model:\n  layers: 2\noptim:\n  lr: 0.1\n")
    cfg = load_config(p, ["optim.lr=3e-4", "model.layers=4", "tags=[a,b]", "compile=true",
                          "model.name=1.10", "precision=no", "optim.betas=[0.8, 0.95]",
                          "optim.weight_decay=1", "model.dropout=0.1", "stage=align", "extra.k.v=7"], Cfg)
    assert cfg.optim.lr == float("3e-4") and type(cfg.optim.lr) is float
    assert cfg.model.layers == 4 and type(cfg.model.layers) is int
    assert cfg.tags == ["a", "b"]
    assert cfg.compile is True
    assert cfg.model.name == "1.10"  # a str field gets the text as typed, not the float 1.1
    assert cfg.precision == "no"     # YAML 1.2: 'no' is not a boolean
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.optim.weight_decay == 1.0 and type(cfg.optim.weight_decay) is float  # int accepted for float
    assert cfg.model.dropout == 0.1
    assert cfg.stage is Stage.ALIGN
    assert cfg.extra == {"k": {"v": 7}}  # free-form dicts take new keys


def test_file_values_use_yaml12_floats_and_defaults(tmp_path):
    p = write(tmp_path, "model: {layers: 3}\noptim: {lr: 5e-5}\n")
    cfg = load_config(p, [], Cfg)
    assert cfg.optim.lr == 5e-5
    assert cfg.optim.betas == (0.9, 0.999) and cfg.tags == [] and cfg.precision == "no"


def test_unknown_key_names_path_file_and_suggestion(tmp_path):
    p = write(tmp_path, "model:\n  lyers: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [], Cfg)
    msg = str(e.value)
    assert "model.lyers" in msg and str(p) in msg
    assert "did you mean 'layers'" in msg
    assert "dropout, layers, name" in msg  # the known keys at that level
    assert "model.layers: missing required key" in msg  # and everything else wrong, at once


def test_unknown_override_key_fails_the_same_way(tmp_path):
    p = write(tmp_path, "model: {layers: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["optim.lrr=0.1"], Cfg)
    msg = str(e.value)
    assert "optim.lrr" in msg and "did you mean 'lr'" in msg and "optim.lrr=0.1" in msg and str(p) in msg
    with pytest.raises(ConfigError, match="did you mean 'tags'"):
        load_config(p, ["tag=[x]"], Cfg)
    with pytest.raises(ConfigError, match="it has no key"):
        load_config(p, ["compile.deep=1"], Cfg)  # a bool has no sub-keys


def test_wrong_type_says_expected_and_actual():
    with pytest.raises(ConfigError) as e:
        load_config({"model": {"layers": "four"}, "compile": 1, "tags": "a"}, ["optim.lr=fast"], Cfg)
    msg = str(e.value)
    assert "model.layers: expected int, got str 'four'" in msg
    assert "compile: expected bool, got int 1" in msg
    assert "tags: expected list[str], got str 'a'" in msg
    assert "optim.lr (from override 'optim.lr=fast'): expected float, got str 'fast'" in msg
    assert msg.startswith("4 problems in config <dict>")


def test_literal_optional_and_tuple_length():
    with pytest.raises(ConfigError, match=r"precision .*expected one of 'no', 'bf16', got str 'fp16'"):
        load_config({"model": {"layers": 1}}, ["precision=fp16"], Cfg)
    with pytest.raises(ConfigError, match=r"optim.betas: expected tuple\[float, float\] \(2 items\), got 3 items"):
        load_config({"model": {"layers": 1}, "optim": {"betas": [0.1, 0.2, 0.3]}}, [], Cfg)
    cfg = load_config({"model": {"layers": 1, "dropout": None}}, ["model.dropout="], Cfg)
    assert cfg.model.dropout is None
    with pytest.raises(ConfigError, match="model.layers.*expected int, got null"):
        load_config({"model": {"layers": None}}, [], Cfg)


def test_integral_float_for_int_and_bool_is_not_an_int():
    assert load_config({"model": {"layers": 1}}, ["model.layers=1e3"], Cfg).model.layers == 1000
    with pytest.raises(ConfigError, match="expected int, got float 2.5"):
        load_config({"model": {"layers": 2.5}}, [], Cfg)
    with pytest.raises(ConfigError, match="expected int, got bool True"):
        load_config({"model": {"layers": True}}, [], Cfg)


def test_missing_required_keys_are_listed():
    @dataclass
    class Two:
        a: int
        b: str
        c: int = 0

    with pytest.raises(ConfigError) as e:
        load_config({}, [], Two)
    msg = str(e.value)
    assert "a: missing required key (int)" in msg and "b: missing required key (str)" in msg
    assert "c:" not in msg


def test_must_exist_paths(tmp_path):
    present = tmp_path / "data.jsonl"
    present.write_text("{}\n")

    @dataclass
    class Paths:
        file: Path = path_field(kind="file")
        folder: Optional[Path] = path_field(None, kind="dir")

    cfg = load_config({"file": str(present)}, [], Paths)
    assert cfg.file == present and cfg.folder is None
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError) as e:
        load_config({"file": str(missing)}, [f"folder={present}"], Paths)
    msg = str(e.value)
    assert f"file: path does not exist: {missing}" in msg
    assert f"folder: expected a directory, got a file: {present}" in msg


def test_yaml_round_trip(tmp_path):
    cfg = load_config({"model": {"layers": 2, "name": "3e-4"}}, ["tags=[no, 'yes', '1.5']", "optim.lr=1e-5",
                                                                 "extra.when=2024-01-01", "stage=align"], Cfg)
    assert cfg.model.name == "3e-4" and cfg.tags == ["no", "yes", "1.5"] and cfg.extra == {"when": "2024-01-01"}
    out = save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(out, [], Cfg)
    assert again == cfg
    assert load_config(dump_config(cfg), [], Cfg) == cfg
    data = dump_config(cfg)
    assert data["stage"] == "align" and data["optim"]["betas"] == [0.9, 0.999] and data["data"] is None
    assert "'3e-4'" in dump_config_yaml(cfg)  # quoted: a plain 3e-4 would read back as a float


def test_overrides_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path('{marker}').touch()"

    @dataclass
    class S:
        x: str = ""
        n: int = 0

    cfg = load_config({}, [f"x={payload}"], S)
    assert cfg.x == payload and not marker.exists()
    with pytest.raises(ConfigError, match="n .*expected int, got str"):
        load_config({}, [f"n={payload}"], S)
    assert not marker.exists()
    # YAML's python tags are refused by the safe loader
    p = write(tmp_path, f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, [], S)
    assert not marker.exists()


def test_parse_override_forms():
    assert parse_override("a.b=3e-4") == (["a", "b"], 3e-4)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=") == (["x"], None)
    assert parse_override("x=a=b") == (["x"], "a=b")
    assert parse_override("x=[unclosed") == (["x"], "[unclosed")  # not YAML: stays text
    for bad in ("novalue", "a..b=1", "=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_bad_yaml_files(tmp_path):
    dup = write(tmp_path, "lr: 1\nlr: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(dup)
    assert str(e.value) == f"{dup}: line 2: duplicate key 'lr'"
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    assert load_config(write(tmp_path, "", "empty.yaml"), ["a.b=1"]) == {"a": {"b": 1}}


@dataclass
class Positive:
    n: int = 1

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")


@dataclass
class Outer:
    inner: Positive = field(default_factory=Positive)


def test_post_init_errors_are_reported_with_their_path():
    with pytest.raises(ConfigError, match="inner: n must be >= 1, got 0"):
        load_config({}, ["inner.n=0"], Outer)
    assert load_config({}, ["inner.n=3"], Outer).inner.n == 3
