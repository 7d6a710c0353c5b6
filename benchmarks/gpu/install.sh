#!/usr/bin/env bash
# Run ON THE GPU MACHINE (offline), once per carried part, in order (part1 first):
#
#   bash benchmarks/gpu/install.sh .gpucarry/part1
#
# Creates (or extends) .gpuvenv in the repo root, a venv that sees the machine's own packages (torch 2.11 and the
# rest), installs from PART_DIR with pip --no-index: the ray tarball (unpacked into site-packages with its
# dist-info, so importlib.metadata and pip see ray), then the names in PART_DIR/requirements.txt. Once every
# requirement of the project is met it installs the project itself (pip install --no-deps -e .) and says so;
# otherwise it names what is still missing (another part). Running it again with the same part changes nothing.
set -euo pipefail

PART=${1:?usage: install.sh PART_DIR (e.g. .gpucarry/part1)}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
PART=$(cd "$PART" && pwd)
BASE=${PYTHON:-python3}
VENV=$REPO/.gpuvenv
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_NO_INDEX=1
# every part present (this one first): a part's requirements may be met by wheels in another one
FIND=(--find-links "$PART")
for d in "$REPO"/.gpucarry/part*/; do
    [[ -d $d && $(cd "$d" && pwd) != "$PART" ]] && FIND+=(--find-links "$d")
done

echo "== install.sh $PART ($(du -sh "$PART" | cut -f1)) on $(hostname), $(date -u +%FT%TZ)"

if [[ ! -x $VENV/bin/python ]]; then
    echo "== venv $VENV (--system-site-packages, over $($BASE -c 'import sys; print(sys.executable, sys.version.split()[0])'))"
    if ! $BASE -m venv --system-site-packages "$VENV"; then
        echo "   venv with pip failed (no ensurepip?): without pip, then pip from the carried wheel"
        rm -rf "$VENV"
        $BASE -m venv --system-site-packages --without-pip "$VENV"
    fi
fi
PY=$VENV/bin/python
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# python3 there is itself a venv (/opt/torch/.venv): --system-site-packages then shows the base interpreter's
# packages, not torch's. A .pth file puts python3's own site-packages after ours.
$BASE - "$SITE/_gpu_base_python.pth" <<'PYEOF'
import site, sys
paths = [p for p in site.getsitepackages() if p]
with open(sys.argv[1], "w") as f:
    f.write("\n".join(paths) + "\n")
PYEOF

if ! $PY -m pip --version >/dev/null 2>&1; then
    whl=$(compgen -G "$PART/pip-*.whl" | head -1 || true)
    [[ -n $whl ]] || { echo "no pip in $VENV and no pip wheel in $PART" >&2; exit 1; }
    echo "== pip from $whl"
    $PY "$whl/pip" install --quiet --no-index "$whl"
fi
$PY -c 'import torch; print("   torch", torch.__version__, "from", torch.__file__)' \
    || { echo "torch is not importable from $VENV: the machine's torch is what this check runs on" >&2; exit 1; }

for tarball in "$PART"/ray-*.tar.xz; do
    [[ -e $tarball ]] || continue
    version=$(basename "$tarball" .tar.xz)
    version=${version#ray-}
    if [[ -d $SITE/ray-$version.dist-info ]]; then
        echo "== ray $version already unpacked"
    else
        echo "== ray $version: unpacking $(basename "$tarball") into $SITE"
        tar -C "$SITE" -xJf "$tarball"
        # console script (tar carries no entry-point wrappers)
        printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' "$PY" >"$VENV/bin/ray"
        chmod +x "$VENV/bin/ray"
    fi
done

echo "== pip install --no-index -r $PART/requirements.txt"
if grep -qi '^ray' "$PART/requirements.txt" && ! $PY -c 'import importlib.metadata as m; m.version("ray")' 2>/dev/null; then
    echo "ray is not installed yet and this part has no ray tarball: install the part with ray-*.tar.xz first" >&2
    exit 1
fi
$PY -m pip install --no-index "${FIND[@]}" -r "$PART/requirements.txt" 2>&1 \
    | { grep -v -E '^(Requirement already satisfied|Processing |Looking in links)' || true; }
missing=$($PY - "$REPO" <<'PYEOF'
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

repo = Path(sys.argv[1])
deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
sys.path.insert(0, str(repo))
from cellseg_batch.setup_detectron2 import REQUIRES  # standard library only

missing = []
for text in [*deps, "detectron2==0.6", *REQUIRES]:
    req = Requirement(text)
    if req.name == "imagecodecs":  # not carried (prepare_carry.sh): the check's TIFF is uncompressed
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{req.name} (not installed)")
        continue
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        missing.append(f"{req.name} {have} (wants {req.specifier})")
print("; ".join(missing))
PYEOF
)
if [[ -n $missing ]]; then
    echo "== still missing: $missing"
    echo "   install the part that holds them next (see benchmarks/gpu/README.md)"
    exit 0
fi
if $PY -c 'import cellseg_batch, sys; sys.exit(0 if cellseg_batch.__file__.startswith(sys.argv[1]) else 1)' "$REPO" 2>/dev/null \
   && [[ -x $VENV/bin/cellseg-batch ]]; then
    echo "== project already installed (editable)"
else
    echo "== all requirements met: pip install --no-deps -e ."
    $PY -m pip install --quiet --no-index "${FIND[@]}" --no-deps --no-build-isolation -e "$REPO"
fi
$PY -m pip check || echo "   (pip check's complaints above are about the machine's own packages unless they name ours)"
$PY - <<'PYEOF'
import importlib
import sys

failed = 0
for name in ("torch", "torchvision", "ray", "zarr", "numcodecs", "pycocotools", "fvcore", "detectron2", "pyarrow",
             "cellseg_batch"):
    try:
        m = importlib.import_module(name)
        print(f"   {name:14s} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"   {name:14s} NOT IMPORTABLE: {type(e).__name__}: {e}")
        failed += 1
sys.exit(1 if failed else 0)
PYEOF
echo "== ready: bash benchmarks/gpu/check.sh"
