import os

import torch

from storage import tensors


def test_tensors_round_trip_and_come_back_mapped_not_copied(tmp_path):
    saved = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).bfloat16(), "empty": torch.zeros(0, 3)}
    size = tensors.write(tmp_path / "m.safetensors", saved, {"doc": "7"})
    assert size == (tmp_path / "m.safetensors").stat().st_size and not list(tmp_path.glob("*.tmp"))
    loaded, meta = tensors.read(tmp_path / "m.safetensors")
    assert meta == {"doc": "7"}
    for name, t in saved.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_reading_maps_the_file_and_pages_in_only_what_is_touched(tmp_path):
    tensors.write(tmp_path / "big.safetensors", {"k": torch.ones(16, 1024, 1024)})     # 64 MiB
    before = rss_bytes()
    loaded, _ = tensors.read(tmp_path / "big.safetensors")
    assert rss_bytes() - before < 8 * 2**20
    assert loaded["k"][3].sum() == 1024 * 1024                  # one 4 MiB slice read
    assert rss_bytes() - before < 16 * 2**20


def test_writing_to_a_mapped_tensor_never_changes_the_file(tmp_path):
    tensors.write(tmp_path / "m.safetensors", {"a": torch.zeros(4)})
    loaded, _ = tensors.read(tmp_path / "m.safetensors")
    loaded["a"] += 1
    again, _ = tensors.read(tmp_path / "m.safetensors")
    assert again["a"].sum() == 0


def test_raw_rows_append_truncate_and_map(tmp_path):
    path = tmp_path / "k.raw"
    a, b, junk = torch.randn(3, 2, 4), torch.randn(2, 2, 4), torch.randn(5, 2, 4)
    tensors.append_rows(path, a)
    tensors.append_rows(path, b)
    tensors.append_rows(path, junk)                     # written by a run that was killed before committing
    tensors.truncate_rows(path, (2, 4), torch.float32, 5)
    mapped = tensors.map_rows(path, (2, 4), torch.float32, 5)
    assert torch.equal(mapped, torch.cat([a, b])) and path.stat().st_size == 5 * 8 * 4
    assert tensors.map_rows(path, (2, 4), torch.float32, 0).shape == (0, 2, 4)
