"""A safetensors file written one tensor at a time, from tensors on any device.

`safetensors.torch.save_file` needs every tensor in host memory at once: it hands the Rust writer a pointer
per tensor. For the full Calligrapher adapter that is a 12 GB host copy of weights that live on the GPU,
made at every checkpoint on top of what the trainer already holds in host memory (the fp32 EMA, the old
policy's master, the parked snapshots): on a 128 GB machine it was what pushed a real-size run out of host
memory while saving. Here each tensor is copied to the host in pieces of at most `chunk_bytes` and written
straight away, so the host holds one piece at a time.

The file is the format's own, byte for byte what `save_file` writes for the same tensors (tests check it):
an 8-byte little-endian header length, the JSON header (`__metadata__` first, then the tensors in data
order) padded with spaces to a multiple of 8, then the data, tensors ordered by dtype as safetensors orders
them (widest first, so every tensor is aligned) and by name within a dtype.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# safetensors' Dtype enum in its declaration order, which is its sort order (the file lists the larger first)
_DTYPES = [(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
           (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.float16, "F16"), (torch.bfloat16, "BF16"),
           (torch.int32, "I32"), (torch.float32, "F32"), (torch.float64, "F64"), (torch.int64, "I64")]
_NAME = {dt: name for dt, name in _DTYPES}
_RANK = {dt: i for i, (dt, _) in enumerate(_DTYPES)}
IN_FLIGHT = 2  # pieces copied to the host and not yet written
# files written side by side by `write_side_by_side`: on the H100 machines' disk one writer with fsync reached
# 1.1 GB/s, two 1.8 GB/s and four no more (bench/disk_write.py, docs/benchmarks.md), so a checkpoint's files
# go two at a time
SIDE_BY_SIDE = 2


def save_file_streamed(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None,
                       chunk_bytes: int = 256 << 20, dtype: torch.dtype | None = None) -> None:
    """Write `tensors` (any devices, any strides) to `path` as `safetensors.torch.save_file` would; with `dtype`,
    its floating-point tensors as that dtype (cast a piece at a time, where they live: no whole cast copy)."""
    def stored(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    for name, t in tensors.items():
        if stored(t) not in _NAME:
            raise TypeError(f"{name}: dtype {stored(t)} has no safetensors name here")
    order = sorted(tensors, key=lambda k: (-_RANK[stored(tensors[k])], k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * stored(t).itemsize
        header[name] = {"dtype": _NAME[stored(t)], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    # one writer thread, in order: the disk writes a piece while the next one comes off the GPU, so the copies
    # and the writes overlap instead of adding up; at most `IN_FLIGHT` pieces are held in host memory
    with open(path, "wb") as fh, ThreadPoolExecutor(1, thread_name_prefix="safetensors-writer") as writer:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        pending: deque = deque()
        for name in order:
            flat = tensors[name].detach().reshape(-1)  # a copy only when the tensor is not contiguous
            step = max(1, chunk_bytes // max(1, flat.element_size()))
            for start in range(0, flat.numel(), step):
                # cast before the copy: a narrower dtype crosses PCIe in fewer bytes
                piece = flat[start:start + step].to(stored(flat)).to("cpu").contiguous()
                pending.append(writer.submit(fh.write, memoryview(piece.view(torch.uint8).numpy())))
                while len(pending) >= IN_FLIGHT:
                    pending.popleft().result()  # a failed write (a full disk) is raised here, in the caller
        while pending:
            pending.popleft().result()


def write_side_by_side(writes: Sequence[Callable[[], object]], writers: int = SIDE_BY_SIDE) -> None:
    """Run file-writing callables `writers` at a time, in the order given (largest first balances best).

    A disk fills up for every writer at once: each write runs to its end (or its own error), and the first
    error, in the order given, is raised after all have stopped, so no thread still writes into a folder the
    caller is about to remove."""
    with ThreadPoolExecutor(max(1, min(writers, len(writes))), thread_name_prefix="checkpoint-writer") as pool:
        futures = [pool.submit(write) for write in writes]
    for future in futures:
        future.result()
