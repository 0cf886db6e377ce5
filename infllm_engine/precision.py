"""The compute dtype this machine runs fastest: measured on the machine, never assumed from its name.

On the CPU, bf16 matmuls are 3-7x faster than fp32 on an Intel Xeon with AMX, and 5x slower on an AMD
EPYC without native bf16. So "auto" takes bf16 only where the CPU says it has native bf16 (AMX or
avx512_bf16) and a matmul of the embedded model's shape then measures faster; fp32 elsewhere. Reading
(512 rows a product) and decoding (one row) are measured apart: on the AMX Xeon a one-row product runs 2x
slower in bf16 than in fp32 (63 against 33 us for [1, 576] x [576, 1536]), and an answer decoded 17 tok/s
in bf16 against 23 in fp32, so there "auto" is "mixed": read in bf16, answer in fp32 (config.DTYPES). On
CUDA, bf16. The memory is stored packed whatever is chosen (kernels.int8), so the choice can differ per
machine, and between reading and answering.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")     # /proc/cpuinfo flags
MARGIN = 1.2                                   # bf16 must win by this much: a tie is not worth the precision


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:                            # not Linux: no flags to read, so no claim of bf16
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def matmul_seconds(dtype: torch.dtype, n: int = 512, hidden: int = 576, inner: int = 1536, reps: int = 5) -> float:
    """Best time of one [n, hidden] x [hidden, inner] matmul (n = 512: a chunk through an MLP of the 135M
    model, as reading runs it; n = 1: a decoded token's)."""
    a, b = torch.randn(n, hidden, dtype=dtype), torch.randn(hidden, inner, dtype=dtype)
    a @ b                                                          # warm-up: kernels chosen, pages touched
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def on_own_thread(fn: Callable[[], T]) -> T:
    """fn() on a short-lived thread: its result, or its exception raised here.

    torch's CPU kernels run on OpenMP (libgomp), which gives every thread that runs a parallel region a
    pool of worker threads, kept until that thread ends. Two pools on 2 cores are more threads than CPUs,
    and libgomp then stops spinning between regions: each region wakes its workers from sleep. The app
    loads the model on its main thread and computes on the model thread (reading.worker), so everything
    ran that way: an answer about a 123K-token book decoded at 7-8 tok/s on the model thread against
    15-17 on the thread that loaded it (bench/results/throughput-cpu.md). Start-up work (loading the
    model, timing a matmul) runs here instead, and its pool ends with the thread.
    """
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:         # raised again on the caller's thread
            out["error"] = err

    thread = threading.Thread(target=run, name="start-up")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@functools.cache
def best_dtype(device: str) -> str:
    """"bfloat16", "mixed" or "float32" for this device (measured once per process on the CPU, about 0.1 s)."""
    if torch.device(device).type == "cuda":
        return "bfloat16"
    if not cpu_flags() & set(NATIVE_BF16):
        return "float32"
    return on_own_thread(_measured)


def _measured() -> str:
    if matmul_seconds(torch.bfloat16) * MARGIN >= matmul_seconds(torch.float32):
        return "float32"
    one_row = {dt: matmul_seconds(dt, n=1, reps=50) for dt in (torch.bfloat16, torch.float32)}
    return "mixed" if one_row[torch.float32] * MARGIN < one_row[torch.bfloat16] else "bfloat16"
