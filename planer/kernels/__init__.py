"""The expert kernels, written in OpenAI's Triton language: one room for what the PyTorch MoE trains with
(`dispatch`, opt-in) and what the TensorRT plugin serves with (`experts`, compiled ahead of time). Not to be
confused with NVIDIA's Triton Inference Server, whose model repositories `planer.serve.triton_repository` writes.

Kept free of triton and torch imports: the TensorRT plugin validates its activation here without either."""

# The kernels' activation codes (a constexpr of each launch); "none" leaves the pre-activation for autograd.
ACTIVATION_CODES = {"none": 0, "relu": 1, "silu": 2, "gelu_tanh": 3, "gelu": 4, "swiglu": 5}
