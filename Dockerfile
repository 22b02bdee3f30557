# planer on an NVIDIA GPU with ONNX Runtime (CUDA), TensorRT and OpenAI Triton.
# Not built or run in this repository's CI (its machines have no GPU and cannot reach NVIDIA's registry);
# tests/test_dockerfile.py reads it for the rules below.
#
#     docker build -t planer-gpu .
#     docker run --gpus all -v planer-work:/work planer-gpu          # the quickstart on ONNX Runtime CUDA
#     docker run --gpus all -v $PWD/work:/work planer-gpu \
#         planer build --model /work/runs/mine --engine trt --target-latency-ms 4 --out /work/builds/mine-trt
#
# BASE must carry TensorRT >= 10.10 with its Python bindings (planer refuses older ones in one line).
ARG BASE=nvcr.io/nvidia/tensorrt:25.06-py3
FROM ${BASE}

WORKDIR /opt/planer
COPY pyproject.toml README.md ./
COPY planer ./planer
COPY benchmarks ./benchmarks
# torch and triton pinned to the versions the TensorRT plugin's PTX handling was run with (benchmarks/RESULTS.md,
# GPU check: torch 2.11.0, Triton 3.6.0): the plugin rewrites the PTX this Triton emits. ONNX Runtime in one
# flavour only, the gpu extra's onnxruntime-gpu: the CPU package would overwrite its CUDA provider. Polygraphy
# from PyPI; the base image's tensorrt stays (the trt extra would fetch another copy from NVIDIA's index).
RUN pip install --no-cache-dir "torch==2.11.0" "triton==3.6.0" "polygraphy>=0.49" \
 && pip install --no-cache-dir -e ".[gpu,sample]" \
 && python -c "import importlib.metadata as m, sys; sys.exit('onnxruntime (CPU) is installed beside onnxruntime-gpu' if 'onnxruntime' in {d.metadata['Name'].lower() for d in m.distributions()} else 0)" \
 && python -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else f'no CUDAExecutionProvider in {o.get_available_providers()}')" \
 && python -c "import tensorrt, tensorrt.plugin, triton, polygraphy, planer.runtime.trt, planer.trt.plugin"

# Runs and builds go to the volume, so that they outlive the container.
VOLUME /work
WORKDIR /work
CMD ["sh", "-c", "planer train --preset tiny --data sample --out runs/tiny && planer build --model runs/tiny --engine ort-cuda --target-speedup 2 --out builds/tiny-x2"]
