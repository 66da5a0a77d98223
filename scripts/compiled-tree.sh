#!/usr/bin/env bash
# Copy the tree (tracked and new files, as they are on disk) to DEST and build the mypyc
# extensions there in place (setup.py, EIR_MYPYC=1), leaving the working tree pure Python.
# Usage: scripts/compiled-tree.sh DEST [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:?usage: $0 DEST [PYTHON]}
py=${2:-.venv/bin/python}
py=$(realpath -s "$py")  # absolute, symlinks kept: a venv's python is a symlink
rm -rf "$dest"
mkdir -p "$dest"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$dest"
cd "$dest"
echo "mypyc: compiling $(grep -c '^    "eir_server/' setup.py) modules in $dest (2-3 minutes)"
EIR_MYPYC=1 "$py" setup.py -q build_ext --inplace --parallel "$(nproc)" > build.log 2>&1 \
  || { tail -40 build.log; exit 1; }
