"""gpu_e2e.py's `studio` stage: the studio's own code paths with a run holding the card, at real size.

1. start a run as the Train tab does (`app.runs.start_run`: the same preflight, path rules and detached process);
2. once it has made its first optimizer step, ask the Inference tab and Compare's side-by-side for an image on
   the same card, through their callbacks: each must fit beside the run or refuse in one line, and the run must
   still be running afterwards (never pushed out of memory);
3. stop it as the Runs tab does (`app.runs.stop_run`: a checkpoint, then `stopped`);
4. with the card free again, the Inference tab inpaints with that checkpoint's EMA weights.
Every wait ends at the bench's deadline; what was reached is recorded either way.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from PIL import Image

POLL_S = 2.0


def _wait(pred, deadline: float):
    """pred()'s first truthy value, or None at the deadline."""
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(POLL_S)
    return None


def bundled_item(resolution: int) -> tuple[str, dict]:
    """(folder, first item) of the bundled data at `resolution`: what the bench paints with."""
    from calligrapher_rl.data import ensure_default_dataset

    data = ensure_default_dataset(resolution=resolution)
    with open(data, encoding="utf-8") as fh:
        return os.path.dirname(data), json.loads(fh.readline())


def _tab_inputs(resolution: int, text: str = "Hello") -> list:
    """The Inference tab's inputs for the bundled data's first item: the editor (source + brushed mask), no mask
    upload, the reference, then text, steps, guidance, strength, seed, images, resize, use context."""
    folder, item = bundled_item(resolution)
    source = np.asarray(Image.open(os.path.join(folder, item["source"])).convert("RGB"))
    mask = np.asarray(Image.open(os.path.join(folder, item["mask"])).convert("L"))
    brush = np.zeros((*mask.shape, 4), dtype=np.uint8)
    brush[..., 3] = np.where(mask > 127, 255, 0)
    ref = np.asarray(Image.open(os.path.join(folder, item.get("reference", item["source"]))).convert("RGB"))
    editor = {"background": source, "layers": [brush], "composite": source}
    return [editor, None, ref, text, 30, 30.0, 1.0, 56, 1, None, False]


def run_studio_stage(preset: str, argv: list[str], runs_root: str, paths: dict, read_roots: list[str],
                     gpus: str, resolution: int, deadline: float, text: str = "Hello") -> dict:
    """The stage's record: seconds, the tabs' one-line answers, the run's states, and `exit` codes (0 = as
    expected, 1 = not, 124 = the deadline came first)."""
    from app import runs as studio

    runs_dir = os.path.join(runs_root, "studio")
    shutil.rmtree(runs_dir, ignore_errors=True)
    os.makedirs(runs_dir)
    out: dict = {"exit": {}}
    t0 = time.time()
    run_dir = studio.start_run(runs_dir, preset, argv, gpus, studio.default_read_roots(runs_dir) + read_roots)
    try:
        return _exercise(studio, run_dir, preset, paths, resolution, text, deadline, t0, out)
    finally:
        _end(studio, run_dir)  # a detached run must not outlive the stage (a device call's next command needs the card)


def _end(studio, run_dir: str, grace_s: float = 90.0) -> None:
    """Stop the run if it is still live: the Runs tab's stop, then SIGKILL after `grace_s` (checked by pid and
    start time, as the studio signals)."""
    import signal

    from app import procs

    if not studio.run_info(run_dir)["live"]:
        return
    try:
        studio.stop_run(run_dir)
    except Exception:  # noqa: BLE001 - whatever the stop met, the kill below still runs
        pass
    if _wait(lambda: not studio.run_info(run_dir)["live"], time.time() + grace_s):
        return
    launch = procs.launch_record(run_dir)
    try:
        procs.signal_run(launch.get("pid"), signal.SIGKILL, created=procs.launch_created(launch))
    except Exception as exc:  # noqa: BLE001 - said, not raised: the stage's record is still written
        print(f"[e2e] could not end the studio's run: {exc}", flush=True)


def _exercise(studio, run_dir, preset, paths, resolution, text, deadline, t0, out) -> dict:
    from app.infer_views import NONE, InferViews

    def stepped():
        info = studio.run_info(run_dir)
        return info if (info["state"] == "running" and info["step"] >= 1) or not info["live"] else None

    info = _wait(stepped, deadline)
    out["studio_first_step_s"] = round(time.time() - t0, 1)
    if info is None or not info["live"]:
        out["exit"]["studio_launch"] = 124 if info is None else 1
        out["studio_run_state"] = studio.run_info(run_dir)["state"]
        return out
    out["exit"]["studio_launch"] = 0

    views = InferViews(os.path.dirname(run_dir))  # the studio's own service, with its GpuRoom (app/gpu_room.py)
    inputs = _tab_inputs(resolution, text)
    t1 = time.time()
    beside = views.generate(NONE, "", paths["flux"], paths["siglip"], *inputs)["inf_msg"]
    compare = views.compare(NONE, None, None, None, paths["flux"], paths["siglip"], *inputs)["cmp_msg"]
    views.service.unload()  # what it loaded beside the run (if it fitted) leaves the card again
    after = studio.run_info(run_dir)
    out.update(studio_infer_beside=beside, studio_compare_beside=compare, studio_tabs_s=round(time.time() - t1, 1),
               studio_run_state_beside=after["state"])
    one_line = all("\n" not in m.strip() for m in (beside, compare))
    out["exit"]["studio_tabs_beside"] = 0 if after["live"] and one_line else 1

    t2 = time.time()
    studio.stop_run(run_dir)
    ended = _wait(lambda: (i := studio.run_info(run_dir)) and (None if i["live"] else i), deadline)
    out["studio_stop_s"] = round(time.time() - t2, 1)
    if ended is None:
        out["exit"]["studio_stop"] = 124
        return out
    out.update(studio_run_state=ended["state"], studio_checkpoints=ended["checkpoints"])
    out["exit"]["studio_stop"] = 0 if ended["state"] == "stopped" and ended["checkpoints"] else 1
    if out["exit"]["studio_stop"]:
        return out

    choices = views.checkpoint_choices(preset)
    t3 = time.time()
    got = views.generate(choices[0][1], "", paths["flux"], paths["siglip"], *inputs)
    out.update(studio_infer_checkpoint=choices[0][0], studio_infer_after=got["inf_msg"],
               studio_infer_after_s=round(time.time() - t3, 1))
    out["exit"]["studio_infer_after"] = 0 if got["out_gallery"] else 1
    views.service.unload()
    return out
