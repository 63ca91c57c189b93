"""tensor_files.save_file_streamed writes what safetensors.torch.save_file writes, a piece at a time."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calligrapher_rl.tensor_files import save_file_streamed, write_side_by_side


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 4, generator=g)
    return {
        "w": torch.randn(5, 7, generator=g), "bf16": torch.randn(3, generator=g).bfloat16(),
        "half": torch.randn(4, 2, generator=g).half(), "long": torch.arange(5), "int": torch.arange(3, dtype=torch.int32),
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "bool": torch.tensor([True, False]),
        "u8": torch.arange(3, dtype=torch.uint8), "f64": torch.randn(2, generator=g).double(),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "view.a": shared[:3], "view.b": shared[3:],  # views of one buffer, which save_file refuses
    }


@pytest.mark.parametrize("chunk_bytes", [1, 8, 1 << 20])
def test_same_bytes_as_safetensors_save_file(tmp_path, chunk_bytes):
    tensors = _tensors()
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, tmp_path / "ref.st", metadata={"format": "pt"})
    save_file_streamed(tensors, str(tmp_path / "ours.st"), metadata={"format": "pt"}, chunk_bytes=chunk_bytes)
    assert (tmp_path / "ours.st").read_bytes() == (tmp_path / "ref.st").read_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_dtype_writes_the_floating_tensors_cast_and_the_others_as_they_are(tmp_path, dtype):
    """What --checkpoint_averages_dtype writes: the same file as save_file of the cast tensors, integers and
    booleans untouched."""
    tensors = _tensors()
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).clone().contiguous() for k, v in tensors.items()}
    save_file(cast, tmp_path / "ref.st", metadata={"format": "pt"})
    save_file_streamed(tensors, str(tmp_path / "ours.st"), metadata={"format": "pt"}, chunk_bytes=8, dtype=dtype)
    assert (tmp_path / "ours.st").read_bytes() == (tmp_path / "ref.st").read_bytes()
    back = load_file(tmp_path / "ours.st")
    assert back["long"].dtype == torch.int64 and back["w"].dtype == dtype


def test_loads_back_with_its_metadata(tmp_path):
    tensors = _tensors()
    meta = {"format": "pt", "layout": "calligrapher-rl/flat"}  # safetensors orders metadata keys by its hash map
    save_file_streamed(tensors, str(tmp_path / "ours.st"), metadata=meta, chunk_bytes=16)
    back = load_file(tmp_path / "ours.st")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(tmp_path / "ours.st", "pt") as fh:
        assert fh.metadata() == meta


def test_no_metadata_and_an_unknown_dtype(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "ref.st")
    save_file_streamed({"x": torch.ones(2)}, str(tmp_path / "ours.st"))
    assert (tmp_path / "ours.st").read_bytes() == (tmp_path / "ref.st").read_bytes()
    with pytest.raises(TypeError, match="complex"):
        save_file_streamed({"c": torch.ones(2, dtype=torch.complex64)}, str(tmp_path / "c.st"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (every write: no space left)")
def test_a_full_disk_is_raised_in_the_caller_and_the_writer_ends(tmp_path):
    """The pieces are written by a thread while the next is copied: a failed write still reaches the caller (the
    trainer turns it into its one-line 'disk full' end), and no writer thread is left behind."""
    big = {"w": torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))}  # 256 KiB: many 4 KiB pieces
    with pytest.raises(OSError) as got:
        save_file_streamed(big, "/dev/full", chunk_bytes=4096)
    assert got.value.errno == errno.ENOSPC
    assert not [t for t in threading.enumerate() if t.name.startswith("safetensors-writer")]


def test_side_by_side_writes_run_at_once():
    """A checkpoint's files are written two at a time: each of two writes waits for the other to have started,
    which only returns if they run together (one after another, the first would wait out the barrier)."""
    both = threading.Barrier(2, timeout=60)
    names = []

    def write(name):
        both.wait()
        names.append(name)

    write_side_by_side([lambda: write("weights"), lambda: write("ema")], writers=2)
    assert sorted(names) == ["ema", "weights"]


def test_side_by_side_a_full_disk_waits_for_the_other_writes_then_raises(tmp_path):
    """A write that fails (a full disk) is raised only after the writes beside it have ended: none is still
    writing into a checkpoint folder that the caller then removes."""
    big = {"w": torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))}
    done = tmp_path / "done.safetensors"

    def slow_but_fine():
        save_file_streamed(big, str(done), chunk_bytes=4096)

    with pytest.raises(OSError) as got:
        write_side_by_side([lambda: save_file_streamed(big, "/dev/full", chunk_bytes=4096), slow_but_fine])
    assert got.value.errno == errno.ENOSPC
    assert torch.equal(load_file(str(done))["w"], big["w"])
    assert not [t for t in threading.enumerate() if t.name.startswith("checkpoint-writer")]
