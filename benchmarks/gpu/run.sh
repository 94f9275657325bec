#!/usr/bin/env bash
# The GPU check in one call on the lent machine (benchmarks/gpu/README.md): install the carried
# wheels (.whl/, from `make gpu-wheels`) and this project, without dependencies, into a folder
# put first on PYTHONPATH, print what is installed and the GPU, then run check.py with this
# script's arguments. The table goes to $OUT (else runs/gpu-check) and to stdout.
#
#   bash benchmarks/gpu/run.sh                      # on the GPU machine: cuda, Qwen2.5-0.5B's shape
#   bash benchmarks/gpu/run.sh --device cpu         # anywhere: small shapes (the test suite's run)
#
# PYTHON (default python3), CAI_GPU_SITE (the install folder, default /tmp/cai-gpu-site) and
# CAI_GPU_WHEELS (default .whl) may be set.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
SITE=${CAI_GPU_SITE:-/tmp/cai-gpu-site}
WHEELS=${CAI_GPU_WHEELS:-.whl}
export OUT=${OUT:-runs/gpu-check}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
started=$(date +%s)

pip_install() {
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --upgrade --target "$SITE" "$@"
}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS into $SITE"
    pip_install "$WHEELS"/*.whl || { echo "error: the carried wheels did not install"; exit 1; }
else
    echo "no wheels in $WHEELS: none installed (make gpu-wheels, then carry .whl)"
fi
# The project, as a user installs it (its own dependencies come from the machine and .whl/).
# Its build needs setuptools>=77 on the machine; without, check.py runs the checkout itself.
if ! pip_install --no-build-isolation . ; then
    echo "warning: the project did not install into $SITE; using the checkout"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "install: $(( $(date +%s) - started )) s"

"$PYTHON" - <<'EOF'
import importlib.metadata as metadata, platform
names = ("torch", "transformers", "trl", "datasets", "pydantic", "pydantic_core", "peft",
         "accelerate", "tokenizers", "pyarrow", "fsspec", "dill", "multiprocess", "pyyaml",
         "typing_extensions", "huggingface_hub", "tensorboard", "cai_cli")
found = []
for name in names:
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} MISSING")
print(f"python {platform.python_version()}: " + ", ".join(found))
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
fi

"$PYTHON" benchmarks/gpu/check.py "$@" 2>&1 | tee "$OUT/gpu-check.log"
status=${PIPESTATUS[0]}
echo "run.sh: $(( $(date +%s) - started )) s in all, exit code $status"
exit "$status"
