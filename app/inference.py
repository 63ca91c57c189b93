"""The studio's inference service: loaded stacks cached per model paths, adapter weights swapped per file.

Loading FLUX.1-Fill + SigLIP is the expensive part, so one stack is kept per (model paths, device, dtype)
(the least recently used one is dropped beyond `max_stacks`). Switching to another checkpoint file of the
same shape only loads its weights into the cached adapter; a file of another shape (other token counts)
reloads the stack with it. "No adapter" runs the same pipeline with style strength 0 (plain FLUX-Fill).
Calls are serialised by a lock: one generation at a time per studio. On a CUDA card, `room` (gpu_room.GpuRoom)
decides before each load whether the stack may go onto a card that training runs share.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from calligrapher_rl.errors import UserError


@dataclass
class Inputs:
    source: Image.Image
    mask: Image.Image  # L, 255 = repaint
    text: str
    reference: Image.Image | None = None
    steps: int = 8
    guidance: float = 30.0
    scale: float = 1.0
    seed: int = 56
    num_images: int = 1
    resolution: int | None = None
    use_context: bool = False


def _device_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def _file_key(path: str | None):
    if not path:
        return None
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


class InferenceService:
    def __init__(self, max_stacks: int = 1, room=None):
        self.max_stacks = max_stacks
        self.room = room
        self._stacks: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    def _stack(self, flux: str, siglip: str, adapter_file: str | None):
        from calligrapher_rl.models.checkpoints import (
            config_from_state_dict,
            load_into_adapter,
            read_adapter_file,
        )
        from calligrapher_rl.models.lora import find_lora
        from calligrapher_rl.models.stack import CalligrapherStack, resolve_model_paths

        flux, siglip = resolve_model_paths(flux.strip(), siglip.strip())
        device, dtype = _device_dtype()
        key = (flux, siglip, device, str(dtype))
        fkey = _file_key(adapter_file)
        # a LoRA checkpoint (models/lora.py) is merged into the transformer too: its stack is never reused for
        # another file, nor another file's stack for it
        lora = adapter_file is not None and find_lora(adapter_file) is not None
        entry = self._stacks.get(key)
        if entry is not None:
            self._stacks.move_to_end(key)
            if entry["adapter"] == fkey or (fkey is None and not entry.get("lora")):
                return entry["stack"]
        if entry is not None and not lora and not entry.get("lora"):
            _, flat = read_adapter_file(adapter_file)
            stack = entry["stack"]
            if config_from_state_dict(flat, stack.adapter.config) == stack.adapter.config:
                load_into_adapter(stack.adapter, flat, adapter_file)
                entry["adapter"] = fkey
                return stack
        if entry is not None:
            self._drop(key)  # another adapter shape, or a LoRA: reload with it
        while len(self._stacks) >= self.max_stacks:
            self._drop(next(iter(self._stacks)))
        if device == "cuda" and self.room is not None:
            from calligrapher_rl.models.footprint import estimated_bytes

            self.room.check(estimated_bytes(flux, siglip, adapter_file))
        stack = CalligrapherStack.from_pretrained(flux, siglip, adapter_path=adapter_file, device=device, dtype=dtype)
        self._stacks[key] = {"stack": stack, "adapter": fkey, "lora": lora}
        return stack

    def _drop(self, key) -> None:
        self._stacks.pop(key, None)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    @contextlib.contextmanager
    def borrowed_stack(self, flux: str, siglip: str, adapter_file: str | None):
        """The cached stack for an evaluation that loads other weights into its adapter: held under the lock, and
        afterwards marked as holding unknown weights (the next generation reloads its file)."""
        with self._lock:
            stack = self._stack(flux, siglip, adapter_file)
            try:
                yield stack
            finally:
                for entry in self._stacks.values():
                    if entry["stack"] is stack:
                        entry["adapter"] = ("weights of an evaluation",)

    def unload(self) -> str:
        with self._lock:
            n = len(self._stacks)
            for key in list(self._stacks):
                self._drop(key)
        return f"unloaded {n} model stack(s)"

    def loaded(self) -> list[tuple]:
        return list(self._stacks)

    def loaded_on_gpu(self) -> bool:
        return any(key[2] == "cuda" for key in self._stacks)

    # ------------------------------------------------------------------ generating
    def generate(self, flux: str, siglip: str, adapter_file: str | None, inputs: Inputs) -> tuple[list[Image.Image], float]:
        """Images for one adapter file (None = no adapter: strength 0) and the seconds it took."""
        from calligrapher_rl.infer import inpaint

        if not (inputs.text or "").strip():
            raise UserError("Text to write: type the text to write")
        limit, why = text_limit(flux)
        if len(inputs.text.strip()) > limit:
            raise UserError(f"Text to write: {len(inputs.text.strip())} characters; {why}")
        if inputs.resolution is not None and (inputs.resolution < 32 or inputs.resolution % MULTIPLE):
            raise UserError(f"Resize to a square: expected a multiple of {MULTIPLE} of at least 32 px (or empty to keep "
                            f"the source's size), got {inputs.resolution}")
        for name, value, lo, hi in (("steps", inputs.steps, 1, 200), ("number of images", inputs.num_images, 1, 16)):
            if value is None or not lo <= int(value) <= hi:
                raise UserError(f"{name} must be in [{lo}, {hi}], got {value}")
        if inputs.scale is None or not 0 <= inputs.scale <= 2:
            raise UserError(f"style strength must be in [0, 2], got {inputs.scale}")
        with self._lock:
            t0 = time.time()
            stack = self._stack(flux, siglip, adapter_file)
            images = inpaint(stack, inputs.source, inputs.mask, inputs.text.strip(), inputs.reference,
                             steps=int(inputs.steps), guidance=float(inputs.guidance),
                             scale=float(inputs.scale) if adapter_file else 0.0, seed=int(inputs.seed),
                             num_images=int(inputs.num_images), use_context=bool(inputs.use_context),
                             resolution=int(inputs.resolution) if inputs.resolution else None)
            return images, time.time() - t0


TINY_MAX_CHARS = 4  # the tiny was pretrained on 1-4 glyph texts (docs/tiny.md)
FLUX_MAX_CHARS = 100  # Calligrapher repaints a word or a short line inside one mask


def text_limit(flux: str) -> tuple[int, str]:
    """(most characters, why) the model can paint."""
    from calligrapher_rl.models.hub import EMBEDDED_NAMES

    if (flux or "").strip() in EMBEDDED_NAMES:
        return TINY_MAX_CHARS, (f"the tiny model writes 1-{TINY_MAX_CHARS} characters (it was pretrained on 1-4 glyph "
                                "texts); longer text comes out as noise")
    return FLUX_MAX_CHARS, (f"at most {FLUX_MAX_CHARS}: Calligrapher repaints a word or a short line inside the mask "
                            "(split longer text over several masks)")


# ---------------------------------------------------------------------- editor values -> images
def _rgb(arr) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    return Image.fromarray(arr[..., :3].astype(np.uint8), "RGB")


def mask_from_upload(arr, size: tuple[int, int]) -> Image.Image:
    """An uploaded mask (white = repaint; a transparent PNG's strokes count too). It must have the source's
    size: a mask of another size is refused, never stretched (which pixels it meant cannot be known)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 4 and arr[..., 3].min() < 255:
        on = arr[..., 3] > 0
    else:
        gray = arr if arr.ndim == 2 else arr[..., :3].astype(np.float32).mean(axis=2)
        on = gray > 127
    mask = Image.fromarray((on * 255).astype(np.uint8), "L")
    if mask.size != size:
        raise UserError(f"the mask is {mask.width}x{mask.height} but the source is {size[0]}x{size[1]}: upload a mask "
                        "of the source's size (or brush the mask on the source)")
    return mask


MULTIPLE = 16  # FLUX works on sides that are multiples of 16 (VAE 8 x patch 2)


def model_size(size: tuple[int, int], resolution: int | None) -> tuple[int, int]:
    """The size the model works at: the asked square, else the source's sides rounded down to 16."""
    if resolution:
        return resolution, resolution
    return tuple(max(MULTIPLE, side // MULTIPLE * MULTIPLE) for side in size)


def size_note(size: tuple[int, int], resolution: int | None) -> str:
    """What happens to the source's size, in words (empty when nothing changes)."""
    out = model_size(size, resolution)
    if out == tuple(size):
        return ""
    if resolution:
        return f"source {size[0]}x{size[1]} resized to {out[0]}x{out[1]} as asked (Resize to a square)"
    return (f"source {size[0]}x{size[1]} resized to {out[0]}x{out[1]}: the model needs sides that are multiples of "
            f"{MULTIPLE}")


def editor_inputs(editor, mask_upload=None) -> tuple[Image.Image, Image.Image]:
    """(source RGB, mask L) from a gr.ImageEditor value (numpy): the background is the source; the mask is what
    was brushed (every layer's alpha), or else the uploaded mask."""
    if not isinstance(editor, dict) or editor.get("background") is None:
        raise UserError("upload a source image into the editor")
    source = _rgb(editor["background"])
    on = np.zeros((source.height, source.width), dtype=bool)
    for layer in editor.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4 and layer.shape[:2] == on.shape:
            on |= layer[..., 3] > 0
    mask = Image.fromarray((on * 255).astype(np.uint8), "L")
    if mask.getbbox() is None and mask_upload is not None:
        mask = mask_from_upload(mask_upload, source.size)
    if mask.getbbox() is None:
        raise UserError("the mask is empty: brush over the text to replace (or upload a mask)")
    return source, mask


def dataset_example(index: int = 0, flux: str | None = None) -> dict:
    """An example for a quick try: source, mask, reference, text. For the embedded tiny models (and no model
    named yet) one of `bundled-glyphs`, the task the pretrained tiny writes; for a real FLUX.1-Fill one of the
    bundled word dataset."""
    import json

    from calligrapher_rl.data import BUNDLED_GLYPHS, ensure_default_dataset, resolve_dataset_path
    from calligrapher_rl.models.hub import EMBEDDED_NAMES

    tiny = (flux or "").strip() in ("", *EMBEDDED_NAMES)
    path = resolve_dataset_path(BUNDLED_GLYPHS) if tiny else ensure_default_dataset()
    with open(path, encoding="utf-8") as fh:
        entries = [json.loads(line) for line in fh if line.strip()]
    e = entries[index % len(entries)]
    root = os.path.dirname(path)

    def load(key, mode):
        with Image.open(os.path.join(root, e[key])) as im:
            return im.convert(mode)

    return {"source": load("source", "RGB"), "mask": load("mask", "L"), "reference": load("reference", "RGB"),
            "text": e["text"]}


class Scorer:
    """The training rewards on studio images: what OCR reads in the repainted region, its OCR score, and the
    SigLIP style score against the reference. Engines load on first use and stay (one per SigLIP path).
    Without the OCR engine's package (a GPU server set up for training only), the OCR columns read None and
    `note` says why, once: the images and the style scores are still worth seeing."""

    def __init__(self):
        self._ocr = None
        self.note = ""  # why a score is missing, for the tab to show
        self._style: dict[str, object] = {}
        self._lock = threading.Lock()

    def score(self, images: list[Image.Image], inputs: Inputs, siglip_path: str) -> list[dict]:
        from calligrapher_rl.images import crop_to_mask
        from calligrapher_rl.rewards import RewardSample, make_reward
        from calligrapher_rl.rewards.ocr import ocr_crop, text_score

        reference = inputs.reference or crop_to_mask(inputs.source, inputs.mask)
        mask = inputs.mask
        out = []
        with self._lock:
            if self._ocr is None and not self.note:
                try:
                    self._ocr = make_reward("ocr")
                except ImportError as exc:
                    self.note = (f"no OCR scores: {exc.name or exc} is not installed here "
                                 "(pip install -r requirements.txt)")
            if siglip_path not in self._style:
                self._style[siglip_path] = make_reward("style", siglip_path=siglip_path, device=_device_dtype()[0])
            # the images come at the model's size (see model_size): the mask follows the same rounding the
            # pipeline applied to it, so the scored region is the repainted one
            samples = [RewardSample(image=im.convert("RGB"), mask=mask if mask.size == im.size else
                                    mask.resize(im.size, Image.NEAREST), text=inputs.text.strip(), reference=reference)
                       for im in images]
            style = self._style[siglip_path].score(samples)
            for sample, st in zip(samples, style):
                read = self._ocr.recognize(ocr_crop(sample)) if self._ocr is not None else None
                out.append({"ocr_text": read, "ocr": None if read is None else text_score(read, sample.text),
                            "style": st})
        return out
