"""The data workers' priority (data.worker_nice): +19 on a CPU by default, their own value when set, and the
DataLoader worker really runs at it."""
import functools
import os

import torch

from vilseg.train import _lower_priority, worker_niceness
from vilseg.training.config import load_config


class _Niceness(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.nice(0)  # os.nice(0) returns the process's niceness without changing it


def test_worker_niceness_defaults_to_19_on_the_cpu_and_0_beside_an_accelerator():
    cfg = load_config("configs/demo.yaml")
    assert cfg.data.worker_nice is None
    assert worker_niceness(cfg, on_cpu=True) == 19 and worker_niceness(cfg, on_cpu=False) == 0
    cfg = load_config("configs/demo.yaml", ["data.worker_nice=5"])
    assert worker_niceness(cfg, on_cpu=True) == 5 and worker_niceness(cfg, on_cpu=False) == 5


def test_the_worker_runs_at_the_raised_niceness():
    base = os.nice(0)
    loader = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1,
                                         worker_init_fn=functools.partial(_lower_priority, 7))
    assert list(loader) == [min(19, base + 7)]
    assert os.nice(0) == base  # the training process itself keeps its priority
