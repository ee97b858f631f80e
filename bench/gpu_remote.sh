#!/usr/bin/env bash
# The GPU check on a lent device machine (no package index there), in two consecutive device calls:
#   bash bench/gpu_remote.sh probe    # carry .gpu/a: the GPU, python3's torch and CUDA, the first half of the pack
#   bash bench/gpu_remote.sh check    # carry .gpu/b, within 30 s: unpack (bench/gpu_pack.py), then gpu_check.sh
# Make the pack here first: .venv/bin/python bench/gpu_pack.py. Results go to $OUT (the device tool brings them
# back); copy gpu_check.md / .json into bench/results/ and commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/pruneviz-gpu-site
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
case "${1:-}" in
  probe)
    [ -f .gpu/a/gguf.part0 ] || { echo "gpu_remote: .gpu/a is missing: carry it (bench/gpu_pack.py makes it)"; exit 2; }
    nvidia-smi -L || true
    python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    echo "probe ok: now the check call, carrying .gpu/b"
    ;;
  check)
    python3 bench/gpu_pack.py --unpack "$SITE"
    export PYTHONPATH="$SITE:$PWD"
    PRUNEVIZ_COMMIT="$(python3 -c 'import json; print(json.load(open(".gpu/b/manifest.json")).get("commit", "unknown"))')"
    export PRUNEVIZ_COMMIT
    python3 -c "import transformers, gguf, torch; print('transformers', transformers.__version__, 'gguf', \
gguf.__version__ if hasattr(gguf, '__version__') else '?', 'torch', torch.__version__)"
    exec env PYTHON=python3 bash bench/gpu_check.sh --out "${OUT:-$PWD/bench/results}" "${@:2}"
    ;;
  *)
    echo "usage: bash bench/gpu_remote.sh probe|check [gpu_check.py options]" >&2
    exit 2
    ;;
esac
