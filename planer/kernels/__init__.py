"""The expert kernels, written in OpenAI's Triton language: one room for what the PyTorch MoE trains with
(`dispatch`, opt-in) and what the TensorRT plugin serves with (`experts`, compiled ahead of time). Not to be
confused with NVIDIA's Triton Inference Server, whose model repositories `planer.serve.triton_repository` writes."""
