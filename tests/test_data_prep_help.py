"""`python -m data_prep build --help` documents every option."""
import re
import subprocess
import sys


def test_every_build_option_has_help_text():
    text = subprocess.run([sys.executable, "-m", "data_prep", "build", "--help"], capture_output=True, text=True,
                          check=True).stdout
    options = text.split("options:", 1)[1]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    assert len(entries) >= 20
    for entry in entries:
        lines = entry.splitlines()
        documented = len(lines) > 1 or re.search(r"\S {2,}\S", lines[0].strip())
        assert documented, f"no help for {lines[0].strip()}"
