"""Turn bench.passkey JSON files into the markdown table of bench/results/passkey-cpu.md.

    python -m bench.passkey_table bench/out > bench/results/passkey-cpu.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("infllm", "streaming", "full")


def load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def render(results: list[dict], not_run: dict[tuple[str, int], str]) -> str:
    lengths = sorted({r["length"] for r in results} | {n for _, n in not_run})
    by_cell = {(r["method"], r["length"]): r for r in results}
    lines = ["| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for method in METHODS:
        cells = []
        for n in lengths:
            r = by_cell.get((method, n))
            if r:
                k = len(r["samples"])
                cells.append(f"{sum(s['correct'] for s in r['samples'])}/{k} ({100 * r['accuracy']:.0f} %)")
            else:
                cells.append(not_run.get((method, n), "not run"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per sample (depth = where the key sits in the filler; 0 = start, 1 = end):", "",
              "| method | length | depth | key | answer | correct | seconds |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (METHODS.index(r["method"]), r["length"])):
        for s in r["samples"]:
            answer = s["answer"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['method']} | {s['length']} | {s['depth']:.2f} | {s['key']} | {answer} | "
                         f"{'yes' if s['correct'] else 'no'} | {s['seconds']} |")
    lines += ["", "Commands, one per cell:", "", "```"]
    lines += sorted({r["command"] for r in results})
    lines += ["```"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(load(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out")), {}))
