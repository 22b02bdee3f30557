"""planer: compile a trained Transformer into a faster sparsely-activated (MoE) network.

The import package is light on purpose: `planer.runtime` (serving) must not
pull in torch, so nothing here imports the training stack.
"""

__version__ = "0.1.0"
