import pytest

from vilseg.config import find_default, load_config


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


def test_experiment_objectives_replace_the_defaults_and_overrides_merge_into_them():
    cfg = load_config("configs/mmc/pretrain-demo.yaml", ["objectives.msd.out_dim=64", "objectives.xm={weight: 1}"])
    assert set(cfg.objectives) == {"mim", "msd", "gc", "xm"}  # the default's vis and clu are gone
    assert cfg.objectives["msd"]["out_dim"] == 64 and cfg.objectives["msd"]["weight"] == 1.0  # merged, not replaced


def test_default_is_found_in_a_parent_folder(tmp_path):
    (tmp_path / "default.yaml").write_text("train: {steps: 10}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "exp.yaml").write_text("train: {steps: 20}\n")
    assert find_default(tmp_path / "sub" / "exp.yaml") == tmp_path / "default.yaml"
    assert load_config(tmp_path / "sub" / "exp.yaml").train.steps == 20


@pytest.mark.parametrize("name", ["demo", "demo_xm_only", "demo_no_cluster", "debug", "mmc/pretrain-debug",
                                  "mmc/pretrain-demo", "mmc/vilseg-demo", "mmc/vilseg-debug",
                                  "mmc/pretrain-vit-s16", "mmc/pretrain-vit-b16", "mmc/vilseg-vit-b16"])
def test_repository_configs_resolve_and_build_their_objectives(name):
    from vilseg.objectives import REGISTRY, parse_options

    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.name and cfg.train.steps > 0
    for objective, options in cfg.objectives.items():  # every option is known and well typed
        options = {k: v for k, v in options.items() if k != "weight"}
        parse_options(REGISTRY[objective].Options, options, f"objectives.{objective}")
