import pytest

from vilseg.config import load_config


def test_layers_default_experiment_and_overrides(tmp_path):
    (tmp_path / "default.yaml").write_text("train: {steps: 10, lr: 0.1}\nmodel: {name: a, overrides: {}}\n")
    (tmp_path / "exp.yaml").write_text("train: {steps: 20}\nmodel: {overrides: {n_clusters: 4}}\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.lr=0.5"])
    assert cfg.train.steps == 20 and cfg.train.lr == 0.5 and cfg.model.overrides == {"n_clusters": 4}


def test_misspelt_key_names_key_and_file(tmp_path):
    (tmp_path / "default.yaml").write_text("train: {steps: 10}\n")
    (tmp_path / "exp.yaml").write_text("train: {stpes: 20}\n")
    with pytest.raises(KeyError, match=r"train\.stpes.*exp\.yaml"):
        load_config(tmp_path / "exp.yaml")
    with pytest.raises(KeyError, match=r"trian.*command-line override"):
        load_config(tmp_path / "default.yaml", ["trian.steps=3"])


def test_repository_configs_resolve():
    for name in ("demo", "demo_xm_only", "demo_no_cluster", "debug"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.model.name and cfg.train.steps > 0
