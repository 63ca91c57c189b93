"""Past one machine, on one CPU host: two "nodes" of two gloo processes each, started as a user starts them on
two machines (`accelerate launch --config_file configs/accelerate/multinode-2x8.yaml --machine_rank 0/1`, the
shipped config with the process count and the main node's address overridden on the command line).

The bench's first update (`bench/multi_gpu_bench.py --tiny --iters 0`) over 4 global micro-batches - one on
each of the 4 processes, averaged by DDP across the nodes - must give the gradient of one process that
accumulates all 4 (weight 1/4 each).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "multi_gpu_bench.py")
CONFIG = os.path.join(ROOT, "configs", "accelerate", "multinode-2x8.yaml")
DEADLINE_S = 300  # a node that never joins the rendezvous would otherwise hold the other one for 15 minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # its own session: the launcher and the workers it forks are one process group, ended together
    return subprocess.Popen(args, cwd=os.path.dirname(BENCH), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_all(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, int]:
    """Exit codes as the processes end; the first failure (or the deadline) ends the others, since a node whose
    peer died waits in a collective until its own timeout."""
    ended: queue.Queue = queue.Queue()
    for name, proc in procs.items():
        threading.Thread(target=lambda n=name, p=proc: ended.put((n, p.wait())), daemon=True).start()
    codes: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(codes) < len(procs):
            name, code = ended.get(timeout=max(0.0, deadline - time.monotonic()))
            codes[name] = code
            if code != 0:
                break
    except queue.Empty:
        pass
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return codes


@pytest.mark.slow
def test_two_nodes_of_two_processes_give_the_one_process_update(tmp_path):
    port = _free_port()
    bench = [BENCH, "--tiny", "--iters", "0", "--global_batches", "4"]
    procs = {"one process": [sys.executable, *bench, "--out", str(tmp_path / "one")]}
    for rank in (0, 1):
        procs[f"node {rank}"] = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG,
                                 "--num_processes", "4", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                 "--main_process_port", str(port), "--mixed_precision", "no",
                                 "--dynamo_backend", "no", *bench, "--out", str(tmp_path / "nodes")]
    logs = {name: open(tmp_path / f"{name.replace(' ', '-')}.log", "w") for name in procs}
    started = {name: _start(args, logs[name]) for name, args in procs.items()}  # all at once, as on 2 machines
    codes = _wait_all(started, DEADLINE_S)
    for log in logs.values():
        log.close()
    for name in procs:
        tail = (tmp_path / f"{name.replace(' ', '-')}.log").read_text()[-3000:]
        assert codes.get(name) == 0, f"{name}: exit {codes.get(name, 'killed at the deadline')}\n{tail}"
    for method in ("grpo", "nft"):
        one = torch.load(tmp_path / "one" / f"grad-{method}-w1.pt", weights_only=True)
        nodes = torch.load(tmp_path / "nodes" / f"grad-{method}-w4.pt", weights_only=True)
        assert one.keys() == nodes.keys() and len(one) == 8
        for name in one:
            assert one[name].norm() > 0, f"{method}: no gradient reached {name}"
            rel = float((one[name] - nodes[name]).norm() / one[name].norm())
            assert rel < 1e-5, f"{method} {name}: the 2-node gradient differs by {rel:.2e}"
