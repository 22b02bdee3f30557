"""The engine-measured latency table: per-block profiling, prediction, calibration."""

from planer.latency.table import LatencyTable, TableError

__all__ = ["LatencyTable", "TableError"]
