"""Latency-aware architecture search (PLANER) with the engine in the loop."""
