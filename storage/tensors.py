"""Tensor files: safetensors, written atomically, read back memory-mapped.

safetensors' own loader copies each tensor into RAM. A document's memory can be far larger than RAM
wants to hold, and a question touches only the blocks it retrieves, so reading here maps the file
and wraps each tensor's bytes without a copy: pages load when retrieval first touches them.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# safetensors dtype names -> numpy dtypes we can map directly (bf16 goes through int16).
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64, "I32": np.int32, "I8": np.int8,
       "BOOL": np.bool_}


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> int:
    """Write tensors to path atomically (temp file + fsync + rename); returns the file's size in bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map a safetensors file: (tensors viewing the mapping, metadata). Nothing is read until used."""
    path = Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=base) if path.stat().st_size > base else None
    tensors = {}
    for name, info in header.items():
        start, stop = info["data_offsets"]
        raw = data[start:stop] if data is not None else np.zeros(0, np.uint8)
        array = raw.view(_NP[info["dtype"]]).reshape(info["shape"])
        t = torch.from_numpy(array)   # mode "c": copy-on-write pages, so torch sees a writable array
        tensors[name] = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
    return tensors, meta


# Append-only raw arrays: block K/V grow by whole rows as a document is read. A commit appends and
# fsyncs; a resume truncates whatever a killed run wrote past the committed row count.
_RAW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int8: np.int8}


def append_rows(path: Path, rows: torch.Tensor) -> None:
    """Append rows [n, ...] to a raw file (created if missing) and fsync."""
    data = rows.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    with open(path, "ab") as f:
        f.write(data.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def truncate_rows(path: Path, row_shape: tuple[int, ...], dtype: torch.dtype, n: int) -> None:
    """Cut a raw file back to its first n rows (what the library committed)."""
    size = n * int(np.prod(row_shape)) * torch.empty(0, dtype=dtype).element_size()
    if Path(path).exists() and Path(path).stat().st_size != size:
        with open(path, "r+b") as f:
            f.truncate(size)


def map_rows(path: Path, row_shape: tuple[int, ...], dtype: torch.dtype, n: int) -> torch.Tensor:
    """The first n rows of a raw file, memory-mapped: [n, *row_shape], nothing read until used."""
    if n == 0:
        return torch.empty(0, *row_shape, dtype=dtype)
    array = np.memmap(path, dtype=_RAW[dtype], mode="c", shape=(n, *row_shape))
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
