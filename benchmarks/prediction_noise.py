"""Is the latency table's prediction error the prediction's or the machine's? Reads the last
`latency_prediction` run (benchmarks/results/latency_prediction.json, 3 passes per network) and prints
the error scored on each pass alone, and how the measured/predicted ratios of one pass correlate with
another's: near 0 means a network's error does not repeat, i.e. it is timing noise.

    python benchmarks/prediction_noise.py
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations

import numpy as np

from common import RESULTS, smoke_option

CALIBRATE = 5  # as latency_prediction.py: networks 1..5 fit the scale, the rest are held out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke_option(p)  # accepted like every benchmark's; this one reads a recorded file, writes nothing, in a second
    p.parse_args()
    data = json.loads((RESULTS.parent / "results" / "latency_prediction.json").read_text())
    results = data["results"]
    passes = np.array([r["ort_passes"] for r in results])
    predicted = np.array([r["predicted_raw"] for r in results])
    fit, held = slice(1, 1 + CALIBRATE), slice(1 + CALIBRATE, None)
    print(f"run of {data['date']} (commit {data['commit']}), {passes.shape[1]} passes")
    for k in range(passes.shape[1]):
        scale = np.median(passes[fit, k] / predicted[fit])
        error = np.abs(scale * predicted[held] / passes[held, k] - 1)
        print(f"pass {k + 1} alone: median {np.median(error) * 100:.1f} %, p90 {np.percentile(error, 90) * 100:.1f} %")
    ratios = passes / predicted[:, None]
    for a, b in combinations(range(passes.shape[1]), 2):
        print(f"correlation of measured/predicted, pass {a + 1} vs {b + 1}: {np.corrcoef(ratios[:, a], ratios[:, b])[0, 1]:.2f}")


if __name__ == "__main__":
    main()
