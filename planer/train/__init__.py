"""Baseline training, evaluation with the Transformer-XL protocol, and the presets."""
