"""Model paths as users type them: Hub ids from a (fake) local Hugging Face cache, local folders, `tiny`."""

from __future__ import annotations

import shutil

import pytest

from calligrapher_rl.errors import UserError
from calligrapher_rl.models.hub import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_snapshot(cache, repo_id: str, folder: str) -> str:
    """Lay `folder` out as huggingface_hub caches a snapshot of `repo_id` (refs/main -> snapshots/<commit>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    return str(repo / "snapshots" / COMMIT)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny_paths):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flux = _cache_snapshot(cache, "black-forest-labs/FLUX.1-Fill-dev", tiny_paths[0])
    siglip = _cache_snapshot(cache, "google/siglip-so400m-patch14-384", tiny_paths[1])
    return flux, siglip


def test_hub_ids_resolve_from_the_local_cache_and_load(hub_cache):
    from calligrapher_rl.models.stack import CalligrapherStack

    flux = resolve_model("black-forest-labs/FLUX.1-Fill-dev", "flux")
    siglip = resolve_model("google/siglip-so400m-patch14-384", "siglip")
    assert (flux.path, flux.source) == (hub_cache[0], "Hugging Face cache")
    assert (siglip.path, siglip.source) == (hub_cache[1], "Hugging Face cache")
    stack = CalligrapherStack.from_pretrained("black-forest-labs/FLUX.1-Fill-dev", "google/siglip-so400m-patch14-384",
                                              num_style_tokens=8)
    assert type(stack.pipe).__name__ == "FluxFillPipeline" and stack.siglip is not None


def test_doctor_says_which_source_was_used(hub_cache, tiny_paths):
    from calligrapher_rl.doctor import check_paths

    lines = check_paths("black-forest-labs/FLUX.1-Fill-dev", tiny_paths[1], None)
    assert [level for level, _ in lines] == ["ok", "ok"]
    assert lines[0][1] == f"FLUX-Fill: black-forest-labs/FLUX.1-Fill-dev -> {hub_cache[0]} (Hugging Face cache)"
    assert lines[1][1] == f"SigLIP: {tiny_paths[1]} (local folder)"
    assert check_paths("tiny", None, None)[0][1].endswith("(tiny model)")


def test_an_uncached_hub_id_offline_is_one_line_naming_the_cache(hub_cache, tmp_path):
    with pytest.raises(UserError) as exc:
        resolve_model("black-forest-labs/FLUX.1-Kontext-dev", "flux")
    msg = str(exc.value)
    assert msg.startswith("black-forest-labs/FLUX.1-Kontext-dev: --pretrained_model_name_or_path: ")
    assert "not in the Hugging Face cache" in msg and str(tmp_path / "hf-cache") in msg and "HF_HUB_OFFLINE" in msg
    assert "\n" not in msg


def test_local_folders_and_their_errors_are_unchanged(tiny_paths, tmp_path):
    assert resolve_model(tiny_paths[0], "flux").source == "local folder"
    with pytest.raises(UserError, match="no model_index.json"):
        resolve_model(str(tmp_path), "flux")
    with pytest.raises(UserError, match="--siglip_path: not a SigLIP model folder"):
        resolve_model(tiny_paths[0], "siglip")


def test_the_style_reward_takes_a_hub_id_too(hub_cache):
    from calligrapher_rl.rewards.style import load_siglip

    model, processor = load_siglip("google/siglip-so400m-patch14-384")
    assert type(model).__name__ == "SiglipVisionModel" and processor is not None
