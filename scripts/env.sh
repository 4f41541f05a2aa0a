# Sourced by the other scripts: points the build at the project-local PyTorch.
# shellcheck shell=bash
TESSERA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TESSERA_ROOT
export VIRTUAL_ENV="$TESSERA_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
# torch-sys: link against the libtorch shipped inside the torch wheel.
export LIBTORCH_USE_PYTORCH=1
# Incremental caches roughly double a debug build's disk use and buy nothing on a clean
# CI build; set CARGO_INCREMENTAL=1 to keep them for edit-compile loops.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
