#!/usr/bin/env bash
# Keep one earlier run instead of deleting it: each existing PATH is moved to PATH.previous (an older
# PATH.previous is deleted), and the move is printed. Used by the CPU examples before they train again.
#
#   bash examples/keep_previous.sh work_dirs/quickstart/checkpoints work_dirs/quickstart/tensorboard
set -euo pipefail
for path in "$@"; do
  if [[ -e "$path" ]]; then
    rm -rf "$path.previous"
    mv "$path" "$path.previous"
    echo "== kept the earlier $path as $path.previous (replacing an older one)"
  fi
done
