"""The lab's supervised yardstick (benchmarks/oracle.py): its posterior, its loss and its evaluation path."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _oracle():
    if "vilseg_oracle" not in sys.modules:  # benchmarks/ is not a package: loaded by its path
        spec = importlib.util.spec_from_file_location("vilseg_oracle", REPO / "benchmarks" / "oracle.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["vilseg_oracle"] = module
        spec.loader.exec_module(module)
    return sys.modules["vilseg_oracle"]


@pytest.mark.parametrize("kind", ["factorised", "joint"])
def test_posterior_is_a_distribution_over_background_and_the_16_classes(kind):
    head = _oracle().OracleHead(16, kind)
    logits = head(torch.randn(2, 4, 16), (2, 2), (8, 8))
    post = head.log_posterior(logits).exp()
    assert post.shape == (2, 17, 8, 8)
    torch.testing.assert_close(post.sum(1), torch.ones(2, 8, 8))


def test_the_factorised_head_can_name_a_combination_it_never_saw():
    from vilseg.data.synthetic import CLASSES

    head = _oracle().OracleHead(16, "factorised")
    logits = torch.full((1, 9, 1, 1), -8.0)
    logits[0, 0] = 8.0  # an object
    logits[0, 1 + 0] = logits[0, 5 + 0] = 8.0  # colour 0 (red), shape 0 (circle): held out in training
    label = int(head.log_posterior(logits)[0, :, 0, 0].argmax())
    assert CLASSES[label - 1] == "red circle"
    # the loss on that pixel's label is small; on any other label it is large
    assert head.loss(logits, torch.tensor([[[label]]])) < 0.01 < head.loss(logits, torch.tensor([[[label + 1]]]))


def test_a_few_oracle_steps_learn_and_are_scored_by_the_evaluator(tmp_path):
    from data_prep import synthetic

    oracle = _oracle()
    data = tmp_path / "data"
    synthetic.write_eval_split(data / "eval", n=4, image_size=64, seed=3)
    synthetic.write_eval_split(data / "calib", n=4, image_size=64, seed=4)
    (data / "manifest.json").write_text('{"train_samples": 256}')
    report = oracle.train("factorised", 0, 10 / 1955, data, tmp_path / "run")  # 10 steps of the 1x budget
    assert report["steps"] == 10 and 23 < report["step_gflop"] < 24  # the FLOP counter's count of one step
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert 0 <= report["eval"]["miou"] <= 100 and len(report["eval"]["per_class_iou"]) == 17
