#!/usr/bin/env bash
# The suite on an older torch than CI's: a virtual environment of its own with torch==VERSION
# (and the Triton that torch pins), this checkout's python/ on PYTHONPATH and the compiled
# modules of the current install copied beside it (they do not link libtorch, so one build
# serves every torch). Not in CI: a torch from PyPI brings its CUDA libraries (~4 GB).
# Usage: scripts/test_old_torch.sh VERSION [pytest args...]   (e.g. 2.4.1 -n 2)
# Seen 2026-11-28 on 2 cores: 2.4.1 + triton 3.0, the whole suite in ~11 min (the Triton
# interpreter tests skip: they need triton >= 3.4).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/test_old_torch.sh VERSION [pytest args...]}
shift
py=${PYTHON:-python3}
venv=build/torch-$version
if [[ ! -x $venv/bin/python ]]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$version" numpy pytest pytest-xdist nibabel tqdm safetensors
fi
# A copy of the package with the compiled modules the current environment imports.
copy=build/torch-$version-src
rm -rf "$copy" && mkdir -p "$copy"
cp -r python/fastnca "$copy/"
find "$copy" -name "_C*.so" -delete
for so in $("$py" -c "import fastnca, glob, os; print(' '.join(glob.glob(os.path.join(os.path.dirname(fastnca.__file__), '_C*.so'))))"); do
  cp "$so" "$copy/fastnca/"
done
"$venv/bin/python" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
PYTHONPATH="$PWD/$copy" exec "$venv/bin/python" -m pytest -p no:cacheprovider -q "$@"
