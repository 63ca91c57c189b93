"""The GPU panel: utilisation, memory and temperature of every GPU through NVML (`pip install nvidia-ml-py`, which
provides `pynvml`), and which studio run holds it. Independent of the trainer: it reads the driver, not the runs'
metrics. Hidden on a machine without NVML or without a GPU (`rows()` is then empty).
"""

from __future__ import annotations

from . import gpu_queue

COLUMNS = ["GPU", "name", "utilisation %", "memory used / total GiB", "temperature °C", "run"]


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...: no panel
        return None
    return pynvml


def rows(runs_dir: str) -> list[list]:
    """One row per GPU (empty without NVML or GPUs)."""
    nvml = _nvml()
    if nvml is None:
        return []
    held = gpu_queue.busy_gpus(runs_dir)
    out = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            util = nvml.nvmlDeviceGetUtilizationRates(h).gpu
            temp = nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
            out.append([i, name.decode() if isinstance(name, bytes) else name, util,
                        f"{mem.used / 2**30:.1f} / {mem.total / 2**30:.1f}", temp, held.get(i, "")])
    except Exception:  # noqa: BLE001 - a GPU that fell off the bus: show what was read
        pass
    return out
