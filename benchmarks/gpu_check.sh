#!/usr/bin/env bash
# The prepared check for a machine with one NVIDIA GPU, in under 8 minutes, with nothing from the network:
#   1. versions: GPU, torch/CUDA, Triton, ONNX Runtime providers
#   2. every test marked `gpu`: the Triton expert-dispatch kernel inside the MoE block on CUDA against the
#      eager dispatch, and ONNX Runtime's CUDA provider against PyTorch (both MoE lowerings)
#   3. benchmarks/kernel_dispatch.py: MoE layer vs k x dense FFN, E in {2, 4, 8, 16}, B1/B8 T128 (recorded)
# It uses the machine's python3 (torch with CUDA, triton, onnxruntime-gpu) with this checkout on PYTHONPATH;
# WHEELS=DIR installs what the machine lacks from a local folder of wheels (pip --no-index).
#
#     bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" safetensors onnx onnxscript click tqdm pytest \
        starlette uvicorn prometheus-client tokenizers || status=1
fi
nvidia-smi -L || status=1
"$PY" - <<'PYEOF' || status=1
import torch, triton, onnxruntime as ort
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, available {torch.cuda.is_available()}), "
      f"triton {triton.__version__}, onnxruntime {ort.__version__} {ort.get_available_providers()}")
PYEOF
timeout 240 "$PY" -m pytest -q -m gpu tests/test_moe_kernel.py tests/test_export.py -rs || status=1
timeout 240 "$PY" benchmarks/kernel_dispatch.py || status=1
exit $status
