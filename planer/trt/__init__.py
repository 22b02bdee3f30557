"""TensorRT: MoE layers as one plugin whose kernel is compiled ahead of time from OpenAI Triton.

The kernel is planer.kernels.experts (shared with the PyTorch MoE's room); `plugin` is its TensorRT registration (tensorrt.plugin, TensorRT >= 10.10)
with the shape and type rules as plain functions. The engine itself is planer.runtime.trt.
Nothing here imports torch.
"""
