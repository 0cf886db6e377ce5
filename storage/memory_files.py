"""Each document's memory on disk, beside the library's rows.

Memory files of document N live in <data>/memory/N/:
  <field>.<dtype>.raw         [block, layer, *row]   one per block field the engine names (its K/V
                              int8, their scales, representatives), append-only, memory-mapped on load
  state-<tokens>.safetensors  sinks, window and scores at the last commit (a new file each commit)
Documents read before memory format 2 have blocks_{k,v,reprs}.raw in their compute dtype instead
(documents.memory_format says which); reading.upgrade converts them once.
A commit appends blocks and writes the new state file first, then updates SQLite in one transaction,
then removes the previous state file. Whatever a killed run wrote past the last commit is cut off
when the ingest resumes, so a half-written document never counts as read.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import tensors
from .errors import LibraryError


class MemoryFiles:
    """The memory files of a Library's documents (a mixin: it uses the library's dir, db and document())."""

    def memory_dir(self, doc_id: int) -> Path:
        return self.dir / "memory" / str(int(doc_id))

    def commit(self, doc_id: int, state: dict[str, torch.Tensor], new_blocks: dict[str, torch.Tensor],
               read_tokens: int, seconds: float) -> None:
        """Make reading progress durable: new blocks ("{layer}.{field}" rows) + the current state."""
        doc = self.document(doc_id)
        folder = self.memory_dir(doc_id)
        by_field = _by_field(new_blocks)
        added = next(iter(by_field.values())).shape[0] if by_field else 0
        for name, rows in by_field.items():
            path = folder / _block_file(name, rows.dtype)
            tensors.truncate_rows(path, tuple(rows.shape[1:]), rows.dtype, doc["n_blocks"])  # a killed run's rest
            if added:
                tensors.append_rows(path, rows)
        state_file = f"state-{read_tokens}.safetensors"
        tensors.write(folder / state_file, state)
        with self.db.conn:
            self.db["documents"].update(doc_id, {
                "read_tokens": read_tokens, "n_blocks": doc["n_blocks"] + added, "state_file": state_file,
                "read_seconds": doc["read_seconds"] + seconds, "bytes": folder_bytes(folder)})
        if doc["state_file"] and doc["state_file"] != state_file:
            (folder / doc["state_file"]).unlink(missing_ok=True)

    def load(self, doc_id: int, shapes: dict, files: dict[str, str] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The committed memory as (state, blocks) for engine.snapshot.restore; block arrays stay mapped.

        shapes: {"layers": L, field: (row shape per layer, dtype), ...} (engine.snapshot.block_shapes).
        Cuts off anything a killed run wrote past the last commit.
        """
        doc = self.document(doc_id)
        if not doc["state_file"]:
            raise LibraryError(f"document {doc_id} has no memory yet")
        state, _ = tensors.read(self.memory_dir(doc_id) / doc["state_file"])
        return state, self.map_blocks(doc_id, shapes, files)

    def map_blocks(self, doc_id: int, shapes: dict, files: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """The committed blocks, memory-mapped, per layer ("{layer}.{field}"); see load.

        files: a field's file name when it is not the default <field>.<dtype>.raw (old formats).
        """
        doc = self.document(doc_id)
        folder, n, n_layers = self.memory_dir(doc_id), doc["n_blocks"], shapes["layers"]
        blocks = {}
        for name, (shape, dtype) in ((k, v) for k, v in shapes.items() if k != "layers"):
            path = folder / (files or {}).get(name, _block_file(name, dtype))
            if n and not path.exists():
                raise LibraryError(f"the memory of document {doc_id} is missing {path.name}; read it again")
            tensors.truncate_rows(path, (n_layers, *shape), dtype, n)
            mapped = tensors.map_rows(path, (n_layers, *shape), dtype, n)
            for i in range(n_layers):
                blocks[f"{i}.{name}"] = mapped[:, i]
        return blocks

    def replace_memory(self, doc_id: int, state: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor],
                       memory_format: int, config_hash: str) -> None:
        """Swap a ready document's memory for another form of it (a format upgrade), all or nothing:
        the new files are written beside the old ones, SQLite switches in one transaction, then the
        old files go."""
        doc = self.document(doc_id)
        folder = self.memory_dir(doc_id)
        staging = folder / "upgrade"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name, rows in _by_field(blocks).items():
            tensors.append_rows(staging / _block_file(name, rows.dtype), rows)
        state_file = f"state-{doc['read_tokens']}-f{memory_format}.safetensors"
        tensors.write(staging / state_file, state)
        old = {p.name for p in folder.iterdir() if p.is_file()}
        new = {p.name for p in staging.iterdir()}
        for name in new:
            (staging / name).replace(folder / name)
        staging.rmdir()
        with self.db.conn:
            self.db["documents"].update(doc_id, {"state_file": state_file, "memory_format": memory_format,
                                                 "config_hash": config_hash})
        for name in old - new:
            (folder / name).unlink(missing_ok=True)
        with self.db.conn:
            self.db["documents"].update(doc_id, {"bytes": folder_bytes(folder)})


def _by_field(blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """"{layer}.{field}" tensors [n, *row] -> per field, the rows as a block file holds them: [n, layer, *row]."""
    n_layers = 1 + max((int(k.split(".")[0]) for k in blocks), default=-1)
    fields = sorted({k.split(".", 1)[1] for k in blocks})
    return {name: torch.stack([blocks[f"{i}.{name}"] for i in range(n_layers)], dim=1) for name in fields}


def _block_file(field: str, dtype: torch.dtype) -> str:
    return f"{field}.{str(dtype).removeprefix('torch.')}.raw"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*") if p.is_file())
