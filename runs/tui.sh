#!/usr/bin/env bash
# The dashboard in one command: set up .venv (runs/setup.sh), then open mlxchat-tui on the `demo`
# preset (a tiny model on the bundled corpus that trains in minutes on a laptop CPU).
#
#   bash runs/tui.sh                      # configure, then press r to train
#   bash runs/tui.sh --start              # start the demo run at once; extra arguments go to mlxchat-tui
#   bash runs/tui.sh --runs-dir ~/runs    # keep runs elsewhere than ./checkpoints
#
# Over SSH, run it inside tmux (`tmux new -s mlxchat`, then this script): a dropped connection then
# leaves the run training, and `tmux attach -t mlxchat` brings the dashboard back.
# On a Mac, `caffeinate -i bash runs/tui.sh` keeps it from sleeping while a run trains.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
exec .venv/bin/mlxchat-tui --preset demo "$@"
