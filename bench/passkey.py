"""Passkey retrieval (the InfLLM paper's task): a 5-digit key hidden in filler, asked for at the end.

    python -m bench.passkey --method infllm --length 16384 --samples 5 --json out.json

Every sample is written to the JSON with its depth, key, answer and correctness, plus the overall
accuracy. The prompt is a plain completion, which the 135M model answers far more reliably than
the chat template.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from datetime import date

import torch

from infllm_engine import Engine, InfLLMConfig

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def machine() -> str:
    """The CPU model and core count, for results tables."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def build_prompt(engine: Engine, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids of about `length` tokens with the needle at `depth` (0 = start, 1 = end) of the filler."""
    intro, filler = engine.encode(INTRO), engine.encode(FILLER)
    needle, question = engine.encode(NEEDLE.format(key=key)), engine.encode(QUESTION)
    n_fill = max(0, (length - len(intro) - len(needle) - len(question)) // len(filler))
    at = round(depth * n_fill)
    return torch.cat([intro, filler.repeat(at), needle, filler.repeat(n_fill - at), question])


def run_sample(engine: Engine, length: int, depth: float, key: str) -> dict:
    ids = build_prompt(engine, length, depth, key)
    t0 = time.perf_counter()
    answer = engine.generate(engine.new_memory(), ids, max_new_tokens=8).wait()
    found = re.search(r"\d{5}", answer.text)
    return {"length": int(ids.numel()), "depth": depth, "key": key, "answer": answer.text.strip(),
            "correct": bool(found and found.group() == key), "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["full", "streaming", "infllm"], default="infllm")
    parser.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    parser.add_argument("--samples", type=int, default=5, help="samples per depth")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--topk", type=int, default=None)
    parser.add_argument("--n-local", type=int, default=None)
    parser.add_argument("--repr-topk", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (bf16 for a GPU)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)

    knobs = {k: v for k, v in {"topk": args.topk, "n_local": args.n_local, "repr_topk": args.repr_topk}.items() if v is not None}
    cfg = InfLLMConfig(method=args.method, max_tokens=max(args.length * 2, 4096), device=args.device, dtype=args.dtype, **knobs)
    engine = Engine.load(args.model, cfg)
    rng = random.Random(args.seed)
    samples = []
    for depth in args.depths:
        for _ in range(args.samples):
            sample = run_sample(engine, args.length, depth, f"{rng.randrange(10000, 100000)}")
            samples.append(sample)
            print(json.dumps(sample), file=sys.stderr, flush=True)
    result = {
        "method": args.method, "length": args.length, "samples_per_depth": args.samples, "seed": args.seed,
        "config": cfg.to_dict(), "accuracy": sum(s["correct"] for s in samples) / len(samples),
        "machine": machine(),
        "date": date.today().isoformat(), "command": "python -m bench.passkey " + " ".join(argv or sys.argv[1:]),
        "samples": samples,
    }
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{args.method} @ {args.length}: accuracy {result['accuracy']:.2f} over {len(samples)} samples")
    return result


if __name__ == "__main__":
    main()
