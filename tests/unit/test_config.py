"""Config loading: presets, overrides, and the errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune import config
from kubetune.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_presets_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in PRESETS}
    assert "lima/opt-1.3b-lora-c3.yaml" in names  # the classic recipe
    assert any("qlora" in n for n in names)
    assert "quickstart/smollm2-135m-lora-cpu.yaml" in names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_preset_loads(path):
    cfg = config.load(path)
    assert cfg.model.name_or_path and cfg.data.path
    assert cfg.method in ("lora", "qlora")
    if "qlora" in path.name:
        assert cfg.method == "qlora" and cfg.quant.bits == 4 and cfg.quant.quant_type == "nf4"


def test_seed_recipe_matches_the_lesson():
    cfg = config.load(ROOT / "configs/lima/opt-1.3b-lora-c3.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.train.learning_rate == 1e-4 and cfg.train.lr_scheduler == "cosine"
    assert cfg.model.name_or_path == "facebook/opt-1.3b" and cfg.train.merge


def test_defaults_and_frozen():
    cfg = config.from_dict({})
    assert cfg.lora.target_modules == "all-linear" and cfg.method == "lora"
    with pytest.raises(AttributeError):
        cfg.method = "qlora"  # type: ignore[misc]


def test_contract_keys_accepted_by_set():
    cfg = config.load(
        None,
        [
            "model.name_or_path=/m",
            "data.path=d.jsonl",
            "output_dir=/tmp/o",
            "pack.max_length=256",
            "train.max_steps=3",
            "lora.r=4",
            "lora.alpha=8",
            "lora.target_modules=[q_proj,v_proj]",
            "method=qlora",
            "tracking.uri=sqlite:///x.db",
        ],
    )
    assert cfg.pack.max_length == 256 and cfg.train.max_steps == 3 and cfg.lora.r == 4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.method == "qlora"
    assert cfg.tracking.uri == "sqlite:///x.db" and cfg.lora.alpha == 8.0
    assert config.load(None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"


def test_replace_and_flat():
    cfg = config.from_dict({}).replace(**{"lora.r": 8})
    assert cfg.lora.r == 8 and cfg.flat()["lora.r"] == 8 and "train.learning_rate" in cfg.flat()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["lora.alpah=8"], "unknown config key `lora.alpah`; did you mean `lora.alpha`?"),
        (["trian.max_steps=3"], "unknown config key `trian`; did you mean `train`?"),
        (["lora.r=0"], "`lora.r`: 0 must be >= 1"),
        (["lora.r=abc"], "`lora.r`: expected an integer"),
        (["train.learning_rate=-1"], "`train.learning_rate`"),
        (["train.learning_rate=.nan"], "finite"),
        (["lora.dropout=1.5"], "`lora.dropout`: 1.5 must be <= 1.0"),
        (["method=qlroa"], "did you mean `qlora`?"),
        (["lora.target_modules=everything"], "`lora.target_modules`"),
        (["lora.target_modules=[]"], "the list is empty"),
        (["data.eval_size=2.5"], "`data.eval_size`"),
        (["train.merge=maybe"], "expected true or false"),
        (["lora=3"], "`lora`: expected a mapping"),
        (["noequals"], "expected KEY=VALUE"),
        (["a..b=1"], "empty key segment"),
        (["train.epochs=0"], "`train.epochs`: 0.0 must be > 0.0"),
        (["pack.max_length=1.0e+12"], "`pack.max_length`: 1000000000000 must be <= 1048576"),
        (["train.threads=1000000000000"], "`train.threads`"),
        (["train.max_steps=100000000"], None),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    if needle is None:  # a huge but valid number is accepted
        assert config.load(None, overrides).train.max_steps == 10**8
        return
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        config.load(bad)
    bad.write_bytes(b"lora:\n  r: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.load(bad)
    bad.write_text("lora:\n  rr: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key `lora.rr`"):
        config.load(bad)


def test_explain_documents_every_key():
    text = config.explain()
    for key in config.from_dict({}).flat():
        assert key in text, key
