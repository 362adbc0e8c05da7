"""Every command reports a problem in one style: ``PROG COMMAND: message`` (as ``vilseg train:`` always has)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _last_line(args):
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    return run.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, prefix", [
    (["-m", "vilseg.cli", "segment", "x.png", "--model", "no/such/model", "--classes", "cat", "--out", "o"],
     "vilseg segment: "),
    (["-m", "vilseg.cli", "calibrate", "--model", "no/such/model", "--dataset", "synthetic", "--root", "none"],
     "vilseg calibrate: "),
    (["-m", "vilseg.cli", "segment", "x.png", "--modle", "m"], "vilseg segment: "),  # argparse's own errors
    (["-m", "vilseg.cli", "train", "--config", "no/such.yaml"], "vilseg train: "),
    (["-m", "vilseg.train", "--config", "no/such.yaml"], "vilseg train: "),
    (["-m", "data_prep", "build", "--kind", "folder", "--input", "no/such/folder", "--out", "o"],
     "python -m data_prep build: "),
    (["-m", "data_prep", "check", "no/such-{000000..000001}.tar"], "python -m data_prep check: "),
])
def test_errors_name_the_command_and_nothing_else(args, prefix):
    line = _last_line(args)
    assert line.startswith(prefix) and not line[len(prefix):].startswith("error:"), line
