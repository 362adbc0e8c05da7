import pytest

from vilseg.training.config import find_default, load_config


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


@pytest.mark.parametrize("name", ["demo", "ablation/xm-demo", "ablation/xm-clu-demo", "debug", "mmc/pretrain-debug",
                                  "mmc/pretrain-demo", "mmc/vilseg-demo", "mmc/vilseg-debug",
                                  "mmc/pretrain-vit-s16", "mmc/pretrain-vit-b16", "mmc/vilseg-vit-b16",
                                  "clip/vilseg-vit-b16", "clip/clipself-vit-b16", "clip/mmc-vit-b16",
                                  "clip/vilseg-debug", "clip/clipself-debug", "clip/mmc-debug", "clip/vilseg-lab",
                                  "clip/clipself-lab", "vilseg-base"])
def test_repository_configs_resolve_and_build_their_objectives(name):
    from vilseg.objectives import REGISTRY, parse_options

    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.name and cfg.train.steps > 0
    for objective, options in cfg.objectives.items():  # every option is known and well typed
        options = {k: v for k, v in options.items() if k != "weight"}
        parse_options(REGISTRY[objective].Options, options, f"objectives.{objective}")


def test_the_real_data_config_has_none_of_the_synthetic_worlds_settings():
    """configs/vilseg-base.yaml, the README's own-data config: no colour/shape word groups, no folded text subspace,
    its own run.dir (the demo's has all three)."""
    base, demo = load_config("configs/vilseg-base.yaml"), load_config("configs/demo.yaml")
    assert demo.data.hard_negative_groups and demo.train.text_subspace and demo.run.dir == "runs/demo/train"
    assert base.data.hard_negative_groups == [] and base.data.hard_negative_exclude == []
    assert base.train.text_subspace is None and base.run.dir != demo.run.dir
    assert base.model.name == "vilseg-vit-s16-minilm"


@pytest.mark.parametrize("override,expected", [
    ("train.steps=abc", "config train.steps='abc': Input should be a valid integer"),
    ("optim.betas=[0.9]", "config optim.betas=[0.9]: expected 2 values"),
    ("train.checkpoint_every=0", "config train.checkpoint_every=0: Input should be greater than or equal to 1"),
    ("train.log_every=0", "config train.log_every=0: Input should be greater than or equal to 1"),
    ("data.batch_size=8.5", "config data.batch_size=8.5: Input should be a valid integer"),
    ("optim.lr=-0.001", "config optim.lr=-0.001: Input should be greater than 0"),
    ("train.keep_checkpoints=0", "config train.keep_checkpoints=0: Input should be greater than or equal to 1"),
    ("data.masking.fill=blur", "config data.masking.fill='blur': Input should be 'image' or 'noise'"),
])
def test_every_bad_value_gets_one_line_naming_key_value_and_expectation(override, expected):
    from vilseg.training.config import validate_training_config

    with pytest.raises(ValueError) as info:
        validate_training_config(load_config("configs/demo.yaml", [override]))
    lines = str(info.value).splitlines()
    assert len(lines) == 1 and lines[0].strip().startswith(expected), lines


def test_yaml_strings_that_are_numbers_become_numbers():
    from vilseg.training.config import validate_training_config

    # YAML 1.1 reads 1e-3 (no dot) as a string; the schema reads it as the number the user meant
    cfg = validate_training_config(load_config("configs/demo.yaml", ["optim.lr=1e-3"]))
    assert load_config("configs/demo.yaml", ["optim.lr=1e-3"]).optim.lr == "1e-3"
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)


def test_an_experiment_file_outside_configs_layers_on_the_repository_default(tmp_path):
    from vilseg.training.config import validate_training_config

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "my.yaml").write_text("train: {steps: 7}\n")
    cfg = validate_training_config(load_config(tmp_path / "exp" / "my.yaml"))
    assert cfg.train.steps == 7 and cfg.model.name == "vilseg-demo"


def test_mixed_precision_no_given_unquoted_on_the_command_line_means_no():
    from vilseg.training.config import validate_training_config

    cfg = validate_training_config(load_config("configs/demo.yaml", ["train.mixed_precision=no"]))
    assert cfg.train.mixed_precision == "no"
