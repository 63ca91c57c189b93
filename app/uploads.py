"""Image inputs that refuse a file which is not an image in one line naming the field and the file.

Gradio opens an uploaded image before any callback runs; a text file uploaded as the mask ended there with a
bare "Error" on the page and a traceback in the console. `checked(component)` wraps the component's
preprocessing so that the failure reads `Mask: notes.txt is not an image (expected a PNG, JPEG or WebP
picture)`, shown as the error toast (and as the error message of an API call). (A wrapper, not a subclass:
gradio writes a type-stub file beside every module that subclasses a component.)
"""

from __future__ import annotations

import functools
import os

import gradio as gr

EXPECTED = "a PNG, JPEG or WebP picture"


def _name(payload) -> str:
    payload = getattr(payload, "background", None) or payload  # the image editor: its source picture
    for attr in ("orig_name", "path", "url"):
        value = getattr(payload, attr, None)
        if value:
            return os.path.basename(str(value))
    return "the uploaded file"


def not_an_image(label: str | None, payload, exc: Exception) -> gr.Error:
    field = (label or "image").split(":")[0].split("(")[0].strip() or "image"
    return gr.Error(f"{field}: {_name(payload)} is not an image (expected {EXPECTED}; "
                    f"{type(exc).__name__})", print_exception=False)


def checked(component):
    """`component` (gr.Image, gr.ImageEditor) with a one-line error for an upload that is not an image."""
    inner = component.preprocess

    @functools.wraps(inner)
    def preprocess(payload):
        try:
            return inner(payload)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise not_an_image(component.label, payload, exc) from None

    component.preprocess = preprocess
    return component
