#!/usr/bin/env bash
# Packaging check: what a user gets from a regular (non-editable) install, away from the checkout.
#   1. an sdist of the checkout;
#   2. a wheel built FROM that sdist (C++ extension only, MSD_FAST_BUILD_CUDA=0): it fails when the sdist lacks a
#      file the build needs (a header, a kernel), and it is the one compile of this check;
#   3. the wheel holds every module of the checkout (msd_fast/**, kernels/ as msd_fast.kernels) and msd_fast._C;
#   4. it is installed into a FRESH virtual environment (no system site-packages, so a dependency missing from the
#      metadata fails here; pip installs torch and the rest from its cache / the local index);
#   5. from a folder outside the checkout: the import comes from the venv, `msd-fast --help`, a user error through
#      the console script (one line, exit 2) and the protocol at toy sizes (keygen, encode, pretrain, export, probe,
#      export-timm, encrypt-demo) with every file it writes.
# Called by .ci/run after the tests; can be run alone from any checkout (it needs torch, ninja and pybind11 in the
# current python, as the README's install line gives). Prints the seconds it took.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
START=$SECONDS
WORK="$(mktemp -d "${TMPDIR:-/tmp}/msd_fast_package_check.XXXXXX")"
trap 'rm -rf "$WORK"; echo "[package check] exit after $((SECONDS - START)) s"' EXIT
export MSD_FAST_BUILD_CUDA=0
stage() { echo "[package check] $1 ($((SECONDS - START)) s)"; }
quietly() { "$@" > "$WORK/step.log" 2>&1 || { cat "$WORK/step.log"; echo "[package check] failed: $*"; return 1; }; }

stage "sdist"
quietly python -m pip install build
quietly python -m build --sdist --no-isolation --outdir "$WORK/dist" .
SDIST="$(ls "$WORK"/dist/msd_fast-*.tar.gz)"

stage "wheel from the sdist"
quietly python -m pip wheel --no-build-isolation --no-deps --wheel-dir "$WORK/dist" "$SDIST"
WHEEL="$(ls "$WORK"/dist/msd_fast-*.whl)"

stage "wheel contents"
python - "$WHEEL" <<'EOF'
import pathlib, sys, zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
expected = {str(p) for p in pathlib.Path("msd_fast").rglob("*.py") if "__pycache__" not in p.parts}
expected |= {"msd_fast/kernels/" + p.name for p in pathlib.Path("kernels").glob("*.py")}
missing = sorted(expected - names)
assert not missing, f"the wheel lacks {missing}"
assert any(n.startswith("msd_fast/_C.") and n.endswith(".so") for n in names), "the wheel lacks msd_fast._C"
assert not any(n.startswith("kernels/") for n in names), "the wheel installs a top-level kernels package"
print(f"wheel holds all {len(expected)} modules of the checkout and msd_fast._C")
EOF

stage "fresh virtual environment"
python -m venv "$WORK/venv"
VENV="$WORK/venv/bin"
quietly "$VENV/python" -m pip install "$WHEEL"

stage "smoke run outside the checkout"
mkdir "$WORK/outside"
cd "$WORK/outside"
"$VENV/python" - "$WORK/venv" "$ROOT" <<'EOF'
import importlib.util, os, sys

import msd_fast, msd_fast._C, msd_fast.kernels

venv, checkout = (os.path.realpath(p) for p in sys.argv[1:])
where = os.path.realpath(msd_fast.__file__)
print("msd_fast.__file__ =", where)
assert where.startswith(venv + os.sep) and not where.startswith(checkout + os.sep), where
assert importlib.util.find_spec("kernels") is None, "a top-level kernels module is importable"
assert msd_fast.backends()["cpu"].available, msd_fast.backends()["cpu"]
EOF
M="$VENV/msd-fast"
"$M" --help > help.txt
grep -q "pretrain" help.txt
status=0
"$M" pretrain missing.shard --out p 2> error.txt || status=$?
[ "$status" -eq 2 ] && [ "$(wc -l < error.txt)" -eq 1 ] && ! grep -q Traceback error.txt \
    || { echo "a user error should be one line and exit 2, got status $status:"; cat error.txt; exit 1; }
# The protocol at toy sizes, one command per step (demo --quick takes minutes on 2 cores; this about one).
quietly "$M" keygen --out k.key
quietly "$M" encode --key k.key --data synthetic:96 --image-size 32 --patch-size 8 --out c0.shard
quietly "$M" pretrain c0.shard --out p --depth 1 --embed-dim 24 --num-heads 2 --out-dim 32 --head-hidden-dim 32 \
    --head-bottleneck-dim 16 --epochs 2 --batch-size 32 --local-views 1 --warmup-epochs 0 --no-progress --device cpu
quietly "$M" export --checkpoint p/checkpoint.pt --out model.safetensors
quietly "$M" probe --model model.safetensors --key k.key --data synthetic:96 --image-size 32 --device cpu --out probe
quietly "$M" export-timm --model model.safetensors --key k.key --out timm_model
quietly "$M" encrypt-demo --size 32 --patch-size 8 --key k.key --out enc
for file in k.key c0.shard p/checkpoint.pt p/loss_curve.png model.safetensors probe/probe.json \
    timm_model/config.json timm_model/model.safetensors enc/encryption_demo.png; do
    [ -s "$file" ] || { echo "the smoke run did not write $file"; exit 1; }
done
cd "$ROOT"

stage "package check passed; removing $WORK"
