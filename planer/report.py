"""What a build tells a person: report.md, the latency/accuracy plot and the block diagram."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planer.arch import Architecture
from planer.files import replacing
from planer.latency import LatencyTable
from planer.train.evaluate import headline

COLOURS = {"attn": "#4c72b0", "linear": "#64b5cd", "ffn": "#55a868", "moe": "#dd8452"}
MARKERS = {"baseline": ("s", "#333333"), "candidate": ("o", "#aaaaaa"), "result": ("*", "#c44e52"),
           "comparison": ("D", "#8172b3")}


@dataclass(frozen=True)
class Point:
    label: str
    latency_ms: float
    metrics: dict[str, float]  # from planer.train.evaluate.scores / evaluate
    kind: str = "baseline"  # a key of MARKERS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def pareto_plot(points: list[Point], path: Path, *, title: str) -> None:
    """Latency (x) against the corpus metric (y, bpc or perplexity: lower is better on both)."""
    plt = _pyplot()
    metric = "bpc" if "bpc" in points[0].metrics else "ppl"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, (marker, colour) in MARKERS.items():
        chosen = [p for p in points if p.kind == kind]
        if chosen:
            ax.scatter([p.latency_ms for p in chosen], [p.metrics[metric] for p in chosen], marker=marker,
                       color=colour, s=120 if kind == "result" else 40, zorder=3)
        for p in chosen:
            ax.annotate(p.label, (p.latency_ms, p.metrics[metric]), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
    ax.set_xlabel("latency p50 (ms, measured in the engine)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def arch_plot(rows: list[tuple[str, Architecture]], table: LatencyTable, path: Path) -> None:
    """Each network as its block sequence; a block's width is its latency in the table."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.7 * len(rows)))
    for y, (name, arch) in enumerate(reversed(rows)):
        x = table.scale * table.fixed_ms(arch.head_precision)
        ax.barh(y, x, height=0.6, color="#bbbbbb", edgecolor="white")  # embedding, head, memory handling
        for block in arch.blocks:
            width = table.scale * table.block_ms(block)
            ax.barh(y, width, left=x, height=0.6, color=COLOURS.get(block.kind, "#999999"), edgecolor="white")
            ax.text(x + width / 2, y, block.label(), ha="center", va="center", fontsize=6, rotation=90,
                    color="white")
            x += width
        ax.text(x, y, f"  {table.predict(arch):.2f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)])
    ax.set_xlabel("predicted latency (ms, calibrated latency table)")
    colours = COLOURS | {"fixed": "#bbbbbb"}
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()], labels=list(colours),
              loc="lower right", fontsize=8)
    ax.margins(x=0.12)
    _save(fig, path)
    plt.close(fig)


def _verdict(latency: dict, accuracy: dict, result_arch: Architecture) -> str:
    """Plain words on what the comparisons show, including when they do not favour the result. Networks are
    compared by their speedups, each its own runs' median: their figures come from different runs."""
    speedups = latency["confirmation"]["speedups"]
    res, res_x = accuracy["result"], speedups["result"]
    lines = []
    if not any(b.kind == "moe" for b in result_arch.blocks):
        lines.append("The search chose no MoE block, so the dense-only comparison does not test MoE against dense.")
    for name, other in accuracy["comparisons"].items():
        if other["loss"] <= res["loss"] and speedups[name] >= res_x:
            lines.append(f"**{name} is at least as good on both counts**: {headline(other)} at {speedups[name]:.2f}x "
                         f"against the result's {headline(res)} at {res_x:.2f}x ({other['loss'] / res['loss']:.4f}x "
                         "the result's loss).")
    dense = accuracy["comparisons"].get("dense-only")
    if dense is not None:
        dense_x = speedups["dense-only"]
        better = "beats" if res["loss"] < dense["loss"] else "does **not** beat"
        lines.append(f"The MoE search {better} the dense-only search in accuracy: {headline(res)} at {res_x:.2f}x "
                     f"against {headline(dense)} at {dense_x:.2f}x (speedups differ by "
                     f"{abs(res_x / dense_x - 1) * 100:.0f} %).")
    return "".join(f"\n- {line}" for line in lines) + "\n"


def _comparisons(latency: dict, accuracy: dict, archs: dict[str, Architecture], result_arch: Architecture) -> str:
    if not archs:
        return ""
    speedups = latency["confirmation"]["speedups"]
    rows = [("result (MoE search)", latency["result"], speedups["result"], accuracy["result"], None)]
    rows += [(name, latency["comparisons"][name], speedups[name], accuracy["comparisons"][name], archs[name])
             for name in archs]
    table = "\n".join(f"| {name} | {s['p50']:.3f} | {x:.2f} | {headline(a)} | "
                      f"{' '.join(b.label() for b in arch.blocks) if arch else 'above'} |"
                      for name, s, x, a, arch in rows)
    verdict = _verdict(latency, accuracy, result_arch)
    return f"""
## Comparisons (`--compare`)

drop-attention and narrow are sized by the latency table to the result's predicted latency; fastest-precision
is the baseline with each block in the precision the engine runs it fastest, at whatever latency that has.
Each trained on as many tokens as the result (search + distillation steps), timed in the same interleaved
runs as the result and scored in the engine; each network's speedup is the median of its own runs' ratios,
its latency from the run that gave that median.

| network | latency p50 ms | speedup | validation | blocks |
|---|---|---|---|---|
{table}
{verdict}"""


def _decomposition(latency: dict) -> str:
    d = latency.get("decomposition")
    if d is None:
        return ""
    return (f"\nOf the speedup, the architecture bought {d['architecture']:.2f}x (the result with every block in fp32, "
            f"timed in the same runs) and the blocks' precision {d['precision']:.2f}x.")


def _parity_note(latency: dict) -> str:
    disagreement = latency.get("int8_simulation_disagreement")
    if disagreement is None:
        return ""
    return (f" on the result with every block in fp32 (the graph's structure); the int8 graph itself, block by block "
            f"on validation tokens, was {disagreement:.1e} as far from PyTorch's simulation of it as from fp32 (on "
            "random inputs a deep int8 network's outputs part ways by rounding alone; the scores above compare both)")


def _teacher(record: dict) -> str:
    """What the result was distilled from, why, and with what share of cross-entropy (teacher.json)."""
    name = {"baseline": "the baseline", "continued": "the continued baseline"}[record["teacher"]]
    share = record.get("distill_share", 1.0)
    recipe = f" Logits' loss: {share:g} KL to it, {1 - share:g} cross-entropy." if share < 1 else ""
    if record["asked"] != "auto":
        return f"Teacher: {name} (--teacher {record['asked']}).{recipe}"
    if "held_out_loss" not in record:
        return f"Teacher: {name} ({record['why']}).{recipe}"
    losses = record["held_out_loss"]
    windows = record.get("held_out_windows")  # a record from before them: the training split's tail
    where = (f"training tokens neither trained on, in {len(windows)} stretches spread over the training split"
             if windows else "held-out training tokens at the training split's end")
    return (f"Teacher: {name}, the lower loss on {record['held_out_tokens']:,} {where} (baseline "
            f"{losses['baseline']:.4f}, continued {losses['continued']:.4f}).{recipe}")


def _self_distilled(own: dict | None) -> str:
    if own:
        return (" and with the result's own recipe, distilled from the result's teacher "
                "(`baseline-self-distilled/`)")
    return (" (not with the result's own recipe: taught by itself with no cross-entropy, the baseline starts at that "
            "recipe's minimum, so it is its own self-distilled reference)")


def report(run: Path, base_arch: Architecture, result_arch: Architecture, latency: dict, accuracy: dict,
           comparisons: dict[str, Architecture], steps: str, laps: dict[str, float]) -> str:
    b, r = latency["baseline"], latency["result"]
    pb, pr = base_arch.param_counts(), result_arch.param_counts()
    verdict = "met" if latency["met"] else "**missed**"
    kind = f"speedup {latency['target_speedup']:g}" if latency["target_speedup"] else "absolute"
    base, cont, res = accuracy["baseline"], accuracy["baseline_continued"], accuracy["result"]
    own = accuracy.get("baseline_self_distilled")  # none where the recipe cannot move the baseline, or older
    reference = {"baseline_continued": "continued baseline",
                 "baseline_self_distilled": "baseline trained with the result's recipe",
                 "baseline": "baseline (training it on made it worse)"}[accuracy["reference"]]
    self_row = f"| baseline, self-distilled | {own['tokens_trained']:,} | {headline(own)} |\n" if own else ""
    return f"""# planer build of `{run}`

Target {latency['target_ms']:.3f} ms ({kind}): {verdict}.
Measured in {latency['engine'].get('engine')} ({latency['engine'].get('cpu')}, {latency['deployment']['threads']} threads),
batch {latency['deployment']['batch']}, segment {latency['deployment']['tgt_len']}, memory {latency['deployment']['mem_len']};
baseline and result timed interleaved in {len(latency['confirmation']['runs'])} separate runs; the speedup is the median of the runs' ratios
(every run: `latency.json`, `confirmation`).{_decomposition(latency)}

| | baseline | result |
|---|---|---|
| latency p50 / p90 / p99 ms | {b['p50']:.3f} / {b['p90']:.3f} / {b['p99']:.3f} | {r['p50']:.3f} / {r['p90']:.3f} / {r['p99']:.3f} |
| speedup | 1.00 | {latency['speedup']:.2f} |
| parameters total / active | {pb['total'] / 1e6:.2f}M / {pb['active'] / 1e6:.2f}M | {pr['total'] / 1e6:.2f}M / {pr['active'] / 1e6:.2f}M |
| blocks | {' '.join(x.label() for x in base_arch.blocks)} | {' '.join(x.label() for x in result_arch.blocks)} |

Accuracy on the whole validation split of {accuracy['data']}, each network's exported graph run in
{accuracy['evaluated_in']} (PyTorch's own evaluation of the result: {headline(res['pytorch'])}). The result has trained on more tokens than the
baseline (as many steps as the search and the distillation); for a fair comparison the baseline was trained
further on as many tokens, with cross-entropy (`baseline-continued/`){_self_distilled(own)}, and the result is judged
against the best of these. {_teacher(accuracy['teacher'])}

| | tokens trained | validation |
|---|---|---|
| baseline | {base['tokens_trained']:,} | {headline(base)} |
| baseline, continued | {cont['tokens_trained']:,} | {headline(cont)} |
{self_row}| result | {res['tokens_trained']:,} | {headline(res)} |

Result / {reference}, validation loss: {accuracy['result_vs_reference']:.4f}.
{_comparisons(latency, accuracy, comparisons, result_arch)}
Budget: {steps}.
Wall time: {sum(laps.values()) / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in laps.items())}).
ONNX Runtime vs PyTorch on the result: max |difference| {latency['parity_max_abs_diff']:.2e}{_parity_note(latency)}.
Search rounds: `search_log.jsonl`; plots: `pareto.png`, `arch.png`.
"""
