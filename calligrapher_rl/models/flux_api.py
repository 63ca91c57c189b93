"""The few diffusers internals the style processor needs, behind one version check.

The processor re-implements diffusers' `FluxAttnProcessor` with a style branch, so it depends on
internals (`_get_qkv_projections`, the attention dispatcher) that move between releases. It was written
and tested against the version below; any other fails loudly here rather than computing something else.
"""

from __future__ import annotations

import diffusers

SUPPORTED_DIFFUSERS = ("0.42.",)

if not diffusers.__version__.startswith(SUPPORTED_DIFFUSERS):
    raise ImportError(
        f"calligrapher_rl's style attention was written for diffusers {'/'.join(SUPPORTED_DIFFUSERS)}x, "
        f"found {diffusers.__version__}: install diffusers==0.42.1"
    )

from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402
from diffusers.models.transformers.transformer_flux import _get_qkv_projections as get_qkv_projections  # noqa: E402

__all__ = ["apply_rotary_emb", "dispatch_attention_fn", "get_qkv_projections"]
