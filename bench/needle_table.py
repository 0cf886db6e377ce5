"""Markdown tables from a bench.needle JSON file.

    python -m bench.needle_table bench/results/needle-cpu.json > tables.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def _share(rows: list[dict], key: str = "correct") -> str:
    return f"{sum(bool(r[key]) for r in rows)}/{len(rows)}" if rows else "–"


def tables(result: dict) -> str:
    samples = result["samples"]
    variants = list(dict.fromkeys(s["variant"] for s in samples if s["variant"] != "reference"))
    lengths = sorted({s["target_length"] for s in samples if s["variant"] != "reference"})
    depths = sorted({s["depth"] for s in samples})
    ref = [s for s in samples if s["variant"] == "reference"]
    by = defaultdict(list)
    for s in samples:
        by[s["variant"], s["target_length"], s["depth"]].append(s)
        by[s["variant"], s["target_length"], None].append(s)
        by[s["variant"], None, s["depth"]].append(s)

    out = ["### Correct answers, per length and depth", "",
           "| variant | length | " + " | ".join(f"depth {d}" for d in depths) + " | all |",
           "|---|---|" + "---|" * (len(depths) + 1)]
    if ref:
        cells = [_share([r for r in ref if r["depth"] == d]) for d in depths]
        out.append(f"| reference: full attention | {ref[0]['length']:,} | " + " | ".join(cells) + f" | {_share(ref)} |")
    for v in variants:
        for n in lengths:
            cells = [_share(by[v, n, d]) for d in depths]
            actual = by[v, n, None][0]["length"] if by[v, n, None] else n
            out.append(f"| {v} | {n // 1024}K ({actual:,}) | " + " | ".join(cells) + f" | {_share(by[v, n, None])} |")

    out += ["", "### Against the reference, per depth (accuracy ÷ the 4K full-attention accuracy at that depth)", "",
            "| variant | length | " + " | ".join(f"depth {d}" for d in depths) + " |", "|---|---|" + "---|" * len(depths)]
    ref_at = {d: sum(r["correct"] for r in ref if r["depth"] == d) / max(1, sum(r["depth"] == d for r in ref)) for d in depths}
    for v in variants:
        for n in lengths:
            cells = []
            for d in depths:
                rows = by[v, n, d]
                acc = sum(r["correct"] for r in rows) / max(1, len(rows))
                cells.append(f"{acc / ref_at[d]:.0%}" if ref_at[d] else "–")
            out.append(f"| {v} | {n // 1024}K | " + " | ".join(cells) + " |")

    out += ["", "### Retrieval and citation", "",
            "Layers: in how many of the model's layers the fact's block was among the attended blocks, mean over "
            "questions whose fact had left the window. Cited first: the fact's span is the answer's first "
            "evidence (Trace.evidence, the app's citation), over correct answers. The other columns rank the "
            "same answers by other orders the bench measured.", "",
            "| variant | length | layers (of 30) | cited first | by summed mass | by decode mass, focus layers |",
            "|---|---|---|---|---|---|"]
    for v in variants:
        for n in lengths:
            rows = by[v, n, None]
            far = [r for r in rows if not r["in_window"]]
            good = [r for r in rows if r["correct"]]
            layers = sum(r["layers_retrieved"] for r in far) / max(1, len(far))
            first = lambda k: f"{sum(r['ranks'].get(k) == 1 for r in good)}/{len(good)}"
            out.append(f"| {v} | {n // 1024}K | {layers:.1f} | {first('evidence')} | {first('mass')} | "
                       f"{first('decode_mid_mass')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(tables(json.load(open(sys.argv[1]))))
