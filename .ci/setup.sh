#!/usr/bin/env bash
# Creates .venv (if needed) and installs vilseg with its test, demo, data and web extras, and Debian's chromium for
# the browser test. Idempotent: a stamp of pyproject.toml skips the pip step when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv  # absent or half-built (an interrupted set-up): start clean
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.vilseg-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import vilseg" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch comes with its matching torchvision (never torch 2.13: that resolves to a CPU-only build)
  .venv/bin/python -m pip install --quiet -e ".[test,demo,data,web,test-web]"
  echo "$want" > "$stamp"
fi
# the web demo's browser test needs a real browser; none can be downloaded at install time, Debian's can
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
      || echo "could not install chromium: the browser test will fail under CI" >&2
  else
    echo "chromium/chromedriver missing: install Debian's chromium and chromium-driver for the browser test" >&2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing is downloaded at run time
