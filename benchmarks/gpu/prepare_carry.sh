#!/usr/bin/env bash
# Run HERE (a machine with network access), from anywhere in the repo: downloads what the GPU machine lacks as
# Python 3.12 x86-64 wheels and packs them into parts under .gpucarry/ (git-ignored), each small enough for one
# device call to carry (the device tool carries at most 64 MiB a call, working tree included).
#
#   bash benchmarks/gpu/prepare_carry.sh            # uses ./.venv/bin/python (or $PYTHON) to run pip
#
# What travels: the project's dependencies and detectron2's (the wheel setup_detectron2 builds), with their
# dependencies, resolved for CPython 3.12 / manylinux x86_64 (ray without its [default] extra: see below), minus
# the large wheels of packages the GPU machine already has (PREINSTALLED below, from .library/device/KINDS.md).
# Ray's wheel is too large: it is unpacked (file modes kept), stripped of ray/jars, rllib, serve, tune, train and
# llm (none of which ray.init, tasks or actors need) and repacked as ray-VERSION.tar.xz with its dist-info. Large wheels (pyarrow) get a part of their own.
# Each part holds requirements.txt: the names install.sh installs from it.
set -euo pipefail

REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$REPO"
PY=${PYTHON:-.venv/bin/python}
CARRY=.gpucarry
PART_LIMIT=$((60 * 1024 * 1024))   # bytes per part (the tool's limit is 64 MiB with the working tree)
OWN_PART=$((20 * 1024 * 1024))     # a wheel this large gets a part of its own
KEEP_SMALL=$((1024 * 1024))        # preinstalled there, but carried anyway when this small (in case theirs is too old)
# Pure-Python packages detectron2 needs that PyPI has only as sdists: built into py3-none-any wheels here.
SDIST_ONLY=("fvcore==0.1.5.post20221221" "antlr4-python3-runtime==4.9.3")
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# On the GPU machine already (KINDS.md, "Python packages already there"), normalized names.
PREINSTALLED=" absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
nanobind narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pluggy portalocker prometheus-client propcache protobuf psutil pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp "
PREINSTALLED=" ${PREINSTALLED//$'\n'/ } "
# pyarrow is listed there too by KINDS.md but not by the environment notes: it is carried (own part) either way.
RAY_DROP=(jars rllib serve tune train llm)

human() { numfmt --to=iec-i --suffix=B "$1"; }
norm() { local s=${1,,}; s=${s//_/-}; echo "${s//./-}"; }

rm -rf "$CARRY"
mkdir -p "$CARRY/dl" "$CARRY/built" "$CARRY/stage"

echo "== detectron2 wheel (setup_detectron2 --wheel-dir)"
"$PY" -m cellseg_batch.setup_detectron2 --wheel-dir "$CARRY/built"

echo "== sdist-only pure-Python requirements as wheels: ${SDIST_ONLY[*]}"
"$PY" -m pip wheel --quiet --no-deps -w "$CARRY/built" "${SDIST_ONLY[@]}" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

echo "== requirements: the project's and detectron2's, for cp312 manylinux x86_64"
mapfile -t PROJECT_DEPS < <("$PY" - <<'PYEOF'
import tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if not dep.startswith("imagecodecs"):  # see below
        print(dep)
PYEOF
)
# imagecodecs (26 MB) is not carried: the check reads an uncompressed synthetic TIFF, which tifffile reads without it,
# and with it the parts would need a third device call. install.sh does not ask for it either.
# Ray without its [default] extra: cellseg-batch starts Ray with include_dashboard=False, and the extra's packages
# (virtualenv, cryptography, py-spy, pydantic, opencensus, opentelemetry, ... about 18 MB) would push the part
# with ray over the limit. Set RAY_EXTRA=default to carry them anyway (then split the parts by hand).
RAY_EXTRA=${RAY_EXTRA:-}
for i in "${!PROJECT_DEPS[@]}"; do
    if [[ ${PROJECT_DEPS[$i]} == ray\[default\]* ]]; then
        PROJECT_DEPS[$i]="ray${RAY_EXTRA:+[$RAY_EXTRA]}${PROJECT_DEPS[$i]#ray\[default\]}"
    fi
done
echo "   ${PROJECT_DEPS[*]}"
# The versions tested here (the dry run's venv) where the same package is asked for, so the GPU runs the same code.
"$PY" -m pip freeze --exclude-editable 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' \
    | grep -v -i -E '^(torch|torchvision|nvidia-|triton|detectron2|cellseg)' >"$CARRY/constraints.txt" || true
"$PY" -m pip download --quiet "${PLATFORM[@]}" -d "$CARRY/dl" --find-links "$CARRY/built" \
    -c "$CARRY/constraints.txt" "${PROJECT_DEPS[@]}" "detectron2==0.6" pip setuptools \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
cp "$CARRY"/built/*.whl "$CARRY/dl/" 2>/dev/null || true

echo "== stage: drop what the GPU machine has (large wheels), repack ray"
declare -A SIZE=() KIND=()
for whl in "$CARRY"/dl/*.whl; do
    base=$(basename "$whl")
    name=$(norm "${base%%-*}")
    bytes=$(stat -c %s "$whl")
    if [[ $name == ray ]]; then
        version=$(cut -d- -f2 <<<"$base")
        tmp=$CARRY/ray-unpacked
        rm -rf "$tmp"
        mkdir -p "$tmp"
        # extract keeping the wheel's file modes (python -m zipfile drops them: ray's gcs_server and raylet
        # binaries would lose their executable bit)
        "$PY" - "$whl" "$tmp" <<'PYEOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode)
PYEOF
        echo "   executables kept: $(find "$tmp/ray/core" -type f -perm -u+x | wc -l) under ray/core"
        for d in "${RAY_DROP[@]}"; do rm -rf "${tmp:?}/ray/$d"; done
        find "$tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
        tarball=$CARRY/stage/ray-$version.tar.xz
        echo "   ray $version: wheel $(human "$bytes"), dropping ${RAY_DROP[*]}; xz -6 ..."
        (cd "$tmp" && tar -cf - -- ray ray-*.dist-info) | xz -6 -T0 >"$tarball"
        rm -rf "$tmp"
        SIZE[$tarball]=$(stat -c %s "$tarball")
        KIND[$tarball]=ray
        continue
    fi
    if [[ $PREINSTALLED == *" $name "* && $name != pip && $name != setuptools && $bytes -gt $KEEP_SMALL ]]; then
        echo "   skip $base ($(human "$bytes"); the GPU machine has $name)"
        continue
    fi
    cp "$whl" "$CARRY/stage/"
    SIZE[$CARRY/stage/$base]=$bytes
    KIND[$CARRY/stage/$base]=wheel
done

echo "== parts (at most $(human $PART_LIMIT) each)"
# part1: the ray tarball and every wheel below OWN_PART; then one part per large wheel.
part=1
mkdir -p "$CARRY/part1"
total1=0
large=()
for f in "${!SIZE[@]}"; do
    if [[ ${KIND[$f]} == wheel && ${SIZE[$f]} -ge $OWN_PART ]]; then
        large+=("$f")
    else
        mv "$f" "$CARRY/part1/"
        total1=$((total1 + SIZE[$f]))
    fi
done
if ((total1 > PART_LIMIT)); then
    echo "part1 is $(human $total1), over $(human $PART_LIMIT): raise OWN_PART's split or drop more" >&2
    exit 1
fi
# What install.sh installs from part1: the project's requirements, detectron2 and ray (ray's own package comes
# from the tarball; pip then fetches ray's requirements from the part's wheels).
{
    for dep in "${PROJECT_DEPS[@]}"; do
        dep_name=$(norm "$(sed -E 's/[[<>=!~; ].*//' <<<"$dep")")
        is_large=0
        for f in "${large[@]}"; do
            [[ $(norm "$(basename "$f" | cut -d- -f1)") == "$dep_name" ]] && is_large=1
        done
        ((is_large)) || echo "$dep"
    done
    echo "detectron2==0.6"
} >"$CARRY/part1/requirements.txt"
for f in "${large[@]}"; do
    part=$((part + 1))
    mkdir -p "$CARRY/part$part"
    mv "$f" "$CARRY/part$part/"
    base=$(basename "$f")
    echo "${base%%-*}" >"$CARRY/part$part/requirements.txt"
done
rm -rf "$CARRY/stage"
for d in "$CARRY"/part*; do
    bytes=$(du -sb "$d" | cut -f1)
    echo "   $d: $(human "$bytes") ($bytes bytes), $(find "$d" -name '*.whl' | wc -l) wheels$(
        compgen -G "$d/ray-*.tar.xz" >/dev/null && echo " + $(basename "$d"/ray-*.tar.xz)"), installs: $(
        paste -sd' ' "$d/requirements.txt")"
done
echo "== done: carry one part per device call (see benchmarks/gpu/README.md)"
