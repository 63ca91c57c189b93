"""Model paths as users type them: a local folder, `tiny` (the offline tiny model), or a Hugging Face Hub id.

A Hub id (`black-forest-labs/FLUX.1-Fill-dev`, `google/siglip-so400m-patch14-384`) is looked up in the local
Hugging Face cache first (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub, read when the
call is made). When it is not cached and `HF_HUB_OFFLINE` is not set, it is downloaded into that cache:
the FLUX pipeline through diffusers (only the files the pipeline loads, not the single-file checkpoint
beside them), SigLIP's configuration and weights through huggingface_hub. Every outcome says which source
was used (`python -m calligrapher_rl.doctor` prints it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import UserError

# what a folder of each kind must hold, and the flag that names it
KINDS = {
    "flux": ("model_index.json", "--pretrained_model_name_or_path", "a FluxFillPipeline folder"),
    "siglip": ("config.json", "--siglip_path", "a SigLIP model folder"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a local folder holding the model
    source: str  # "local folder" | "tiny model" | "Hugging Face cache" | "Hugging Face download"
    name: str  # what the user typed

    def describe(self) -> str:
        shown = self.path if self.name == self.path else f"{self.name} -> {self.path}"
        return f"{shown} ({self.source})"


def hub_cache_dir() -> str:
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return os.path.join(home, "hub")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


EMBEDDED_NAMES = ("tiny", "tiny-pretrained")  # resolved to the embedded tiny stacks (models/tiny.py)


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def resolve_model(name: str, kind: str) -> ResolvedModel:
    """`name` (folder, `tiny`, `tiny-pretrained` or Hub id) -> a checked local folder of `kind` ("flux" or "siglip")."""
    marker, flag, what = KINDS[kind]
    if name in EMBEDDED_NAMES:
        from .tiny import resolve_tiny_names

        pair = resolve_tiny_names(name, name)
        resolved = ResolvedModel(pair[0 if kind == "flux" else 1], f"{name} model", name)
    elif is_hub_id(name):
        resolved = _from_hub(name, kind, flag)
    else:
        resolved = ResolvedModel(os.path.expanduser(name), "local folder", name)
    if not os.path.isfile(os.path.join(resolved.path, marker)):
        raise UserError(f"not {what} (no {marker})", where=resolved.path, field=flag)
    return resolved


def _from_hub(repo_id: str, kind: str, flag: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache = hub_cache_dir()
    try:
        return ResolvedModel(snapshot_download(repo_id, cache_dir=cache, local_files_only=True),
                             "Hugging Face cache", repo_id)
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise UserError(f"not a local folder, and the Hub id is not in the Hugging Face cache {cache} "
                        "(HF_HUB_OFFLINE is set: no download); run `hf download "
                        f"{repo_id}` where the network is allowed, or give a local folder", where=repo_id, field=flag)
    try:
        if kind == "flux":
            from diffusers import FluxFillPipeline

            path = FluxFillPipeline.download(repo_id, cache_dir=cache)
        else:
            path = snapshot_download(repo_id, cache_dir=cache,
                                     allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except GatedRepoError:
        raise UserError("a gated repository: accept its license on the Hub, then `hf auth login`",
                        where=repo_id, field=flag) from None
    except RepositoryNotFoundError:
        raise UserError("not a local folder, and no Hub repository of that name", where=repo_id, field=flag) from None
    except (OSError, ValueError) as exc:  # connection errors, disk full, ...
        raise UserError(f"not in the Hugging Face cache and the download failed ({str(exc).splitlines()[0][:160]})",
                        where=repo_id, field=flag) from None
    return ResolvedModel(str(path), "Hugging Face download", repo_id)
