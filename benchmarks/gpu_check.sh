#!/usr/bin/env bash
# The prepared check for a machine with one NVIDIA GPU, in under 10 minutes, with nothing from the network:
#   1. versions: GPU, torch/CUDA, Triton, ONNX Runtime providers
#   2. every test marked `gpu`: the Triton expert-dispatch kernels (the MoE block's and the TensorRT plugin's)
#      on CUDA against the eager dispatch, and ONNX Runtime's CUDA provider against PyTorch (both lowerings)
#   3. benchmarks/kernel_dispatch.py: the MoE block's grouped kernel and the TensorRT plugin's one-launch kernel
#      vs k x dense FFN, E in {2, 4, 8, 16}, B1/B8 T128 (recorded); benchmarks/expert_kernel_tiles.py: the
#      plugin kernel's tile shapes in fp32 and fp16 and the grouped dispatch as a CUDA graph (recorded),
#      and benchmarks/dispatch_efficiency.py --engine ort-cuda: the same in ONNX Runtime's CUDA provider for
#      both lowerings, `ops` and the fused com.microsoft::MoE (what `--lowering auto` chooses between)
#   4. where TensorRT is importable: its tests (the plugin's kernel compiled for this GPU, engines built from
#      ONNX with planer's MoE plugin, parity against PyTorch) and benchmarks/trt_dispatch.py (recorded)
# It uses the machine's python3 (torch with CUDA, triton, onnxruntime-gpu) with this checkout on PYTHONPATH;
# WHEELS=DIR installs what the machine lacks from a local folder of wheels (pip --no-index).
#
#     bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PLANER_TRITON_EXPERTS=1  # the MoE block's Triton kernel is opt-in until this check has passed
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
timeout 180 "$PY" -m pytest -q -m gpu tests/test_moe_kernel.py tests/test_export.py tests/test_trt_plugin.py \
    tests/test_trt_engine.py -rs || status=1
timeout 120 "$PY" benchmarks/kernel_dispatch.py || status=1
timeout 150 "$PY" benchmarks/expert_kernel_tiles.py || status=1
if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    timeout 120 "$PY" benchmarks/dispatch_efficiency.py --engine ort-cuda --min-seconds 0.5 || status=1
else
    echo "ONNX Runtime here has no CUDA provider (onnxruntime-gpu is not installed): its benchmark was not run"
fi
if "$PY" -c "import tensorrt" 2>/dev/null; then
    timeout 150 "$PY" benchmarks/trt_dispatch.py || status=1
else
    echo "TensorRT is not importable here: its engine build and benchmark were not run"
fi
exit $status
