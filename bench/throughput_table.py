"""Turn a bench.throughput JSON file into the markdown table of bench/results/throughput-*.md.

    python -m bench.throughput_table bench/results/throughput-cpu.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {"infllm": "infllm (app: ingest to disk, then ask)", "full": "HF full attention (sdpa)",
          "floor": "dense floor (no attention context)"}


def table(result: dict) -> str:
    lines = ["| method | tokens | ingest tok/s | of floor | decode tok/s | peak RSS MiB | RSS after load MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        name = LABELS.get(r["method"], r["method"])
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or f"error: {' '.join(r['error'])}"
            lines.append(f"| {name} | {r['length']:,} | not run: {why} | | | | |")
            continue
        lines.append(f"| {name} | {r['tokens']:,} | {r['ingest_tok_s']:.0f} | {r.get('of_floor', 0):.0%} | "
                     f"{r['decode_tok_s']:.1f} | {r['peak_rss_mib']:,} | {r['rss_after_load_mib']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", type=Path)
    args = parser.parse_args(argv)
    result = json.loads(args.json_file.read_text())
    print(f"`{result['command']}` on {result['machine']}, {result['date']}\n")
    print(table(result))


if __name__ == "__main__":
    main()
