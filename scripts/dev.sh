#!/usr/bin/env bash
# The README's two commands: `scripts/dev.sh demo` and `scripts/dev.sh test` (as root).
# Installs what is missing first (scripts/bootstrap.sh), then hands over to `cargo xtask`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/bootstrap.sh
exec cargo xtask "$@"
