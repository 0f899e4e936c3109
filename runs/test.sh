#!/usr/bin/env bash
# Install (runs/setup.sh) and run the test suite. Extra arguments go to pytest.
# The browser test drives the system's Chromium through Playwright; as root with apt-get available
# this installs Debian's `chromium` package (Playwright's own browser download is never used), and
# Debian's `tmux` for the dashboard's end-to-end test in a real terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
if [ "$(uname -s)" = "Linux" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[test] installing Debian's chromium for the browser test"
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "[test] could not install chromium: the browser test will skip (or fail under CI=true)"
  fi
fi
# the dashboard's end-to-end test runs it in a real terminal: Debian's tmux
if [ "$(uname -s)" = "Linux" ] && ! command -v tmux >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[test] installing Debian's tmux for the dashboard's terminal test"
    apt-get install -y -q tmux >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q tmux >/dev/null 2>&1; } \
      || echo "[test] could not install tmux: the terminal test will skip (or fail under CI=true)"
  fi
fi
exec .venv/bin/python -m pytest -q "$@"
