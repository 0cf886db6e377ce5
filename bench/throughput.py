"""Throughput: ingest tokens/s, decode tokens/s and peak memory, for infllm, HF full attention and the dense floor.

    python -m bench.throughput --json bench/results/throughput-cpu.json

Each (method, length) runs in a fresh process, so its peak RSS is its own:
  infllm  the app's path: reading.ingest of a text file into a temporary library (blocks committed
          to disk and read on memory-mapped), then a question answered from the stored memory;
  full    transformers' own forward with sdpa attention and a DynamicCache, fed in 512-token chunks
          (the model sees every past token), then decoding with that cache;
  floor   the model's forward on 512-token chunks with no past and no LM head: what ingest would
          cost if attention were free. Its decode is one token with no past, LM head included.
Decode always generates exactly --decode tokens (end-of-text is ignored) after a short question.
The text is the passkey filler (bench.passkey) with one needle, so every run reads the same tokens.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from bench.passkey import build_prompt, machine
from infllm_engine import Engine, InfLLMConfig

LENGTHS = [8192, 32768, 131072]
METHODS = ["infllm", "full", "floor"]
QUESTION = " What is the pass key? The pass key is"


def _memory() -> dict:
    """Peak RSS of this process and its current anonymous/file-backed split, in MiB."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key.lower() + "_mib"] = round(int(value.split()[0]) / 1024)
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def _row(tokens: int, ingest_s: float, decode_tok_s: float) -> dict:
    return {"tokens": tokens, "ingest_s": round(ingest_s, 2), "ingest_tok_s": round(tokens / ingest_s, 1),
            "decode_tok_s": round(decode_tok_s, 2)}


def _decode_loop(step, first, n: int) -> float:
    """Tokens/s of n greedy steps: step(token) -> logits [V]."""
    token, t = int(torch.argmax(first)), time.perf_counter()
    for _ in range(n):
        token = int(torch.argmax(step(token)))
    return n / (time.perf_counter() - t)


def _evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (POSIX_FADV_DONTNEED: no root needed), so the next
    read comes from the disk: a cold reload, as after a reboot."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _resident(folder: Path) -> int | None:
    """Bytes of a folder's files in the page cache (util-linux fincore), to check an eviction; None without it."""
    files = [str(p) for p in folder.rglob("*") if p.is_file()]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(x) for x in out.split())


def run_infllm(engine: Engine, ids: torch.Tensor, n_decode: int) -> dict:
    from reading.ingest import ingest, load_memory
    from storage.library import Library

    with tempfile.TemporaryDirectory(dir=Path("bench/out") if Path("bench/out").is_dir() else None) as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text(engine.tokenizer.decode(ids.tolist()))
        library = Library(Path(tmp) / "library")
        t = time.perf_counter()
        done = ingest(library, engine, text)
        ingest_s = time.perf_counter() - t
        disk = library.document(done.doc_id)["bytes"]
        done.memory = None                         # its mapped pages could not be evicted
        gc.collect()
        _evict(library.memory_dir(done.doc_id))
        resident = _resident(library.memory_dir(done.doc_id))
        t = time.perf_counter()                    # cold: the memory's files are not in the page cache
        asking = engine.answering()                # as the app asks ("mixed" answers in fp32)
        memory = load_memory(library, asking, done.doc_id)
        asking.generate(memory, asking.encode(QUESTION), max_new_tokens=1).wait()
        cold_s = time.perf_counter() - t
        asking.stop_ids = set()                    # always n_decode tokens
        answer = asking.generate(memory, asking.encode(QUESTION), max_new_tokens=n_decode + 1)
        answer.wait()
        return {**_row(done.tokens, ingest_s, answer.timings["decode_tokens_per_s"]), "disk_bytes": disk,
                "disk_mib_per_1k_tokens": round(disk / 2**20 / (done.tokens / 1000), 2),
                "cold_load_to_first_token_s": round(cold_s, 2), "resident_before_cold_load_bytes": resident}


def run_full(engine: Engine, ids: torch.Tensor, n_decode: int, chunk: int) -> dict:
    from transformers import DynamicCache

    model = engine.model
    model.set_attn_implementation("sdpa")
    dev = engine.device
    ids = torch.cat([ids, engine.encode(QUESTION)]).to(dev)
    cache = DynamicCache(config=model.config)
    t = time.perf_counter()
    for s in range(0, ids.numel(), chunk):
        piece = ids[s: s + chunk]
        out = model.base_model(input_ids=piece[None], position_ids=torch.arange(s, s + piece.numel(), device=dev)[None],
                               past_key_values=cache, use_cache=True)
    ingest_s = time.perf_counter() - t
    first = model.lm_head(out.last_hidden_state[0, -1])
    pos = ids.numel()

    def step(token: int) -> torch.Tensor:
        nonlocal pos
        h = model.base_model(input_ids=torch.tensor([[token]], device=dev), position_ids=torch.tensor([[pos]], device=dev),
                             past_key_values=cache, use_cache=True).last_hidden_state
        pos += 1
        return model.lm_head(h[0, -1])
    return _row(ids.numel(), ingest_s, _decode_loop(step, first, n_decode))


@torch.inference_mode()
def run_floor(engine: Engine, ids: torch.Tensor, n_decode: int, chunk: int) -> dict:
    model = engine.model
    model.set_attn_implementation("sdpa")
    dev = engine.device
    ids = ids.to(dev)
    t = time.perf_counter()
    for s in range(0, ids.numel(), chunk):
        model.base_model(input_ids=ids[None, s: s + chunk], use_cache=False)
    ingest_s = time.perf_counter() - t

    def step(token: int) -> torch.Tensor:
        h = model.base_model(input_ids=torch.tensor([[token]], device=dev), use_cache=False).last_hidden_state
        return model.lm_head(h[0, -1])
    first = step(int(ids[-1]))
    return _row(ids.numel(), ingest_s, _decode_loop(step, first, n_decode))


def run_one(method: str, length: int, n_decode: int, model: str | None, device: str, dtype: str, kernels: str) -> dict:
    cfg = InfLLMConfig(device=device, dtype=dtype, kernels=kernels, max_tokens=max(2 * length, 4096))
    engine = Engine.load(model, cfg)
    ids = build_prompt(engine, length, 0.5, "48213")[: length - 16]       # room for the question
    loaded = _memory()
    runner = {"infllm": lambda: run_infllm(engine, ids, n_decode),
              "full": lambda: run_full(engine, ids, n_decode, cfg.chunk_size),
              "floor": lambda: run_floor(engine, ids, n_decode, cfg.chunk_size)}[method]
    result = {"method": method, "length": length, **runner(), **_memory(), "rss_after_load_mib": loaded["peak_rss_mib"]}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=False, help="write every row here")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--full-max", type=int, default=32768,
                        help="longest input for HF full attention (its prefill is quadratic: 128K would take hours here)")
    parser.add_argument("--decode", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--model", default=None, help="HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="auto | float32 | bfloat16 | float16 (bf16 for a GPU)")
    parser.add_argument("--kernels", default="auto", help="auto | torch | triton (to compare the two paths)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.decode, args.model, args.device, args.dtype, args.kernels)))
        return {}
    rows = []
    for length in args.lengths:
        for method in args.methods:
            if method == "full" and length > args.full_max:
                rows.append({"method": method, "length": length, "skipped": f"over --full-max {args.full_max}"})
                continue
            cmd = [sys.executable, "-m", "bench.throughput", "--one", method, str(length), "--decode", str(args.decode),
                   "--device", args.device, "--dtype", args.dtype, "--kernels", args.kernels] + (["--model", args.model] if args.model else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"method": method, "length": length, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    floors = {r["length"]: r["ingest_tok_s"] for r in rows if r["method"] == "floor" and "ingest_tok_s" in r}
    for r in rows:
        if "ingest_tok_s" in r and r["length"] in floors:
            r["of_floor"] = round(r["ingest_tok_s"] / floors[r["length"]], 3)
    result = {"machine": machine() if args.device == "cpu" else torch.cuda.get_device_name(),
              "date": date.today().isoformat(),
              "command": "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": InfLLMConfig(device=args.device, dtype=args.dtype, kernels=args.kernels).to_dict(), "rows": rows}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
