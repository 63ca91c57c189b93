"""How fast a machine's disk takes a checkpoint: sequential writes with fsync, by one writer or several at once.

A trainable-`all` checkpoint is ~30 GB written by `training/checkpointing.py`; whether its save time is bound
by the disk, and whether writing its files side by side would help, is a property of the machine, measured here:

    python bench/disk_write.py --dir /root/disktest --gb 8 --writers 1,2,4 --out disk.json
"""
import argparse
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

CHUNK = 64 << 20


def write_one(path: str, nbytes: int, block: bytes) -> None:
    with open(path, "wb") as fh:
        view, left = memoryview(block), nbytes
        while left > 0:
            left -= fh.write(view[:min(left, len(view))])
        fh.flush()
        os.fsync(fh.fileno())


def measure(folder: str, total_gb: float, writers: int, block: bytes) -> dict:
    os.makedirs(folder, exist_ok=True)
    each = int(total_gb * 2**30) // writers
    start = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(lambda i: write_one(os.path.join(folder, f"part{i}"), each, block), range(writers)))
    seconds = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    return {"writers": writers, "gb": round(each * writers / 1e9, 3), "s": round(seconds, 2),
            "gb_per_s": round(each * writers / 1e9 / seconds, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="a folder on the disk to measure (created and removed)")
    ap.add_argument("--gb", type=float, default=8.0, help="GiB written per measurement")
    ap.add_argument("--writers", default="1,2,4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    block = os.urandom(CHUNK)  # incompressible, so no layer below can shortcut it
    usage = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir)) or "/")
    result = {"dir": args.dir, "disk_free_gb": round(usage.free / 1e9, 1), "runs": []}
    for w in (int(x) for x in args.writers.split(",")):
        result["runs"].append(measure(os.path.join(args.dir, f"w{w}"), args.gb, w, block))
        print(json.dumps(result["runs"][-1]), flush=True)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
