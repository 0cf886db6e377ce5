"""Turn bench.passkey JSON files into bench/results/passkey-cpu.md.

    python -m bench.passkey_table bench/out > bench/results/passkey-cpu.md
    python -m bench.passkey_table bench/out --summary      # the accuracy grid alone (for the README)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from infllm_engine.config import METHODS
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)

from bench.passkey import machine


def skipped(method: str, n: int, by_cell: dict) -> str:
    """Why a cell is empty. For full attention past 32K, also what a sample would cost: the longest measured
    full run scaled by the square of the length (an upper bound: only attention grows quadratically)."""
    runs = sorted((length, r) for (m, length), r in by_cell.items() if m == "full")
    if method == "full" and n > 32768 and runs:
        length, r = runs[-1]
        per_sample = sum(s["seconds"] for s in r["samples"]) / len(r["samples"])
        minutes = per_sample * (n / length) ** 2 / 60
        cost = f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
        return f"not run (out of time; est. <= {cost}/sample from {length // 1024}K)"
    return "not run: out of time this session"


def load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def grid(results: list[dict]) -> str:
    by_cell = {(r["method"], r["length"]): r for r in results}
    lines = ["| method | " + " | ".join(f"{n // 1024}K" for n in LENGTHS) + " |", "|---|" + "---|" * len(LENGTHS)]
    for method in METHODS:
        cells = []
        for n in LENGTHS:
            r = by_cell.get((method, n))
            if r:
                ok = sum(s["correct"] for s in r["samples"])
                cells.append(f"{ok}/{len(r['samples'])} ({100 * r['accuracy']:.0f} %)")
            else:
                cells.append(skipped(method, n, by_cell))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: list[dict]) -> str:
    dates = sorted({r["date"] for r in results})
    lines = [
        "# Passkey retrieval on the CPU", "",
        f"Embedded SmolLM2-135M-Instruct (trained to 8K tokens), fp32. Machine: {machine()}, 24 GiB, torch's default 2 threads (this "
        f"project's dev/CI machine). Date: {', '.join(dates)}. Greedy decoding of 8 tokens; a sample is correct when the "
        "first 5-digit number in the answer is the key. Default engine config (n_init 128, n_local 2048, "
        "block 128, repr_topk 4, topk 8, chunk 512). Cells: correct/samples; one sample per depth.", "",
        grid(results), "",
        "Per sample (depth = where the key sits in the filler; 0 = start, 1 = end). `seconds` is the wall time of the "
        "sample on a machine that was also running other work part of the time: not a throughput figure.", "",
        "| method | tokens | depth | key | answer | correct | seconds |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (METHODS.index(r["method"]), r["length"])):
        for s in r["samples"]:
            answer = s["answer"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['method']} | {s['length']} | {s['depth']:.2f} | {s['key']} | {answer} | "
                         f"{'yes' if s['correct'] else 'no'} | {s['seconds']} |")
    lines += ["", "Commands (the whole sweep: `bench/passkey_sweep.sh bench/out`, then this table: "
              "`python -m bench.passkey_table bench/out > bench/results/passkey-cpu.md`):", "", "```"]
    lines += sorted({r["command"] for r in results}, key=lambda c: (c.split("--method ")[-1], len(c), c))
    lines += ["```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path, nargs="?", default=Path("bench/out"))
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    results = load(args.folder)
    print(grid(results) if args.summary else render(results), end="\n" if args.summary else "")
