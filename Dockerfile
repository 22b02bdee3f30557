# planer on an NVIDIA GPU with TensorRT, ONNX Runtime (CUDA) and OpenAI Triton.
# Not built or run in this repository's CI (its machines have no GPU and cannot reach NVIDIA's registry).
#
#     docker build -t planer-gpu .
#     docker run --gpus all planer-gpu                     # trains the tiny baseline, builds it for TensorRT
#     docker run --gpus all -v $PWD/runs:/opt/planer/runs planer-gpu \
#         planer build --model runs/mine --engine trt --target-latency-ms 4
#
# BASE must carry TensorRT >= 10.10 with its Python bindings (planer refuses older ones in one line).
ARG BASE=nvcr.io/nvidia/tensorrt:25.06-py3
FROM ${BASE}

WORKDIR /opt/planer
COPY pyproject.toml README.md ./
COPY planer ./planer
COPY benchmarks ./benchmarks
# torch from the package index is its CUDA build; the base image's tensorrt stays (planer[trt] is not
# installed, it would fetch another copy from NVIDIA's index).
RUN pip install --no-cache-dir "torch>=2.6,<2.15" \
 && pip install --no-cache-dir -e ".[gpu,sample]" \
 && python -c "import tensorrt, triton, onnxruntime, planer.runtime.trt, planer.trt.plugin"

CMD ["sh", "-c", "planer train --preset tiny --data sample --out runs/tiny && planer build --model runs/tiny --engine trt --target-speedup 2 --out builds/tiny-trt-x2"]
