#!/usr/bin/env bash
# Creates .venv at the repository root and installs what `make demo` and `make test` need:
# Debian packages first, then the project with every extra (the tests cover both index
# backends, the LLM path, the CPU Triton and export), at the versions in constraints.txt.
# Re-running is cheap: the Python install is skipped while pyproject.toml, constraints.txt and
# this script are unchanged. `--test` adds the browser the MOS page test drives.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || { echo "setup: $python not found (LookSync needs Python 3.11)" >&2; exit 1; }

# libpython3.11: Triton's python-backend stub links the system libpython.
# redis-server: the tests start their own instance on a free loopback port.
missing=()
dpkg -s libpython3.11 >/dev/null 2>&1 || missing+=(libpython3.11)
command -v redis-server >/dev/null || missing+=(redis-server)
# chromium + its driver: the headless-browser test of the MOS page (`setup.sh --test` only).
if [ "${1:-}" = "--test" ]; then
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
fi
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  echo "setup: installing Python packages into .venv (torch for export makes this take a minute)"
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt \
    -e ".[lancedb,elasticsearch,llm,triton-cpu,export,bench,dev]"
  # Only the tritonserver binary and python backend inside this wheel are used. Its own Python
  # requirements are for PyTriton's API, which LookSync does not import, so none are pulled in.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "nvidia-pytriton==0.7.0"
  rm -f .venv/.installed-*
  touch "$stamp"
  echo "setup: Python packages installed in $(( $(date +%s) - start ))s"
fi
