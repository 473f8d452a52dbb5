#!/usr/bin/env bash
# Set up lens: a Python environment with every dependency, linked at .venv, with lens installed in it
# (editable, which gives the `lens` command).
#
#   bash scripts/setup.sh          # what the app and the CLI need
#   bash scripts/setup.sh --dev    # plus what the tests need
#
# The environment (~6 GB: torch and its CUDA libraries, which also run on CPU) lives outside the
# checkout, in $LENS_ENV_CACHE (default ~/.cache/lens), so clones and CI runs share it. It is
# brought up to date whenever the requirements files change (their hash is the cache key).
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[[ "${1:-}" == "--dev" ]] && dev=1
python=${PYTHON:-python3}
cache=${LENS_ENV_CACHE:-$HOME/.cache/lens}
env="$cache/venv"
requirements=requirements.txt
((dev)) && requirements=requirements-dev.txt   # includes requirements.txt

key=$(cat requirements.txt requirements-dev.txt | sed "1i $requirements $($python -V 2>&1)" | sha256sum | cut -c1-16)
if [[ ! -x "$env/bin/python" ]]; then
  echo "setup: creating the environment in $env"
  mkdir -p "$cache"
  "$python" -m venv "$env"
fi
if [[ ! -f "$env/.requirements-$key" ]]; then
  echo "setup: installing $requirements into $env (first time: several minutes)"
  "$env/bin/python" -m pip install --disable-pip-version-check -q -r "$requirements"
  touch "$env/.requirements-$key"
fi
ln -sfn "$env" .venv
.venv/bin/python -m pip install --disable-pip-version-check -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true

# Exactly one OpenCV distribution: two (e.g. opencv-python and -headless) overwrite each other's files.
opencv=$(.venv/bin/python -m pip list --disable-pip-version-check 2>/dev/null | grep -ci '^opencv' || true)
if [[ "$opencv" != "1" ]]; then
  echo "setup: expected exactly one OpenCV distribution, found $opencv:" >&2
  .venv/bin/python -m pip list 2>/dev/null | grep -i '^opencv' >&2 || true
  exit 1
fi
# The browser end-to-end test drives Debian's chromium (never a browser downloaded by a test tool).
if ((dev)) && ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (apt) for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: no chromium: the browser test will be skipped (apt-get install chromium to run it)"
  fi
fi
echo "setup: ready (.venv -> $env)"
