"""Learning tests on the real reward: GRPO and DiffusionNFT raise the OCR reward of the shipped pretrained
tiny (`tiny-pretrained`) on the presets' data (`bundled-glyphs`, 4 four-character examples), on CPU, and
the same run with each epoch's advantages permuted across its samples does not.

Each test runs its preset (shortened: FLAGS below) in-process with one torch thread, then its permuted
control (same seed), and measures each run's gain as an evaluation, not the noisy training curve: the mean
OCR reward of ODE samples of the 4 training prompts x EVAL_NOISES initial noises (the same noises before
and after) with the final adapter, minus the same with the pretrained (step-0) adapter. The thresholds come
from the same configuration on seeds 1-3 (docs/learning.md, last section).
"""

from __future__ import annotations

import pytest
import torch
from test_learning import PermutedAdvantages

from calligrapher_rl.config import parse_args
from calligrapher_rl.tiny import evaluate_ocr
from calligrapher_rl.training.run_dir import read_metrics
from calligrapher_rl.training.trainer import Trainer

pytestmark = pytest.mark.slow

SEED = 1
EVAL_NOISES = 16  # 4 prompts x 16 = 64 samples per evaluation
# Everything but the method's own values comes from the preset; these shorten it for CI.
SHORT = ["--rl_warmup_steps", "0", "--eval_steps", "0", "--eval_at_start", "false", "--checkpointing_steps", "100000",
         "--report_to", "none", "--seed", str(SEED)]
FLAGS = {
    "grpo": ["--preset", "tiny-grpo", *SHORT, "--max_train_steps", "10", "--learning_rate", "1e-3",
             "--rl_num_images_per_prompt", "16"],
    "nft": ["--preset", "tiny-nft", *SHORT, "--max_train_steps", "20", "--learning_rate", "5e-4"],
    # LoRA (rank 8, transformer + adapter): the same learning values; GRPO's LoRA needs a few more epochs
    "grpo-lora": ["--preset", "tiny-grpo-lora", *SHORT, "--max_train_steps", "14", "--learning_rate", "1e-3",
                  "--rl_num_images_per_prompt", "16"],
    "nft-lora": ["--preset", "tiny-nft-lora", *SHORT, "--max_train_steps", "20", "--learning_rate", "5e-4"],
}
# about half the smallest gain over seeds 1-3 (docs/learning.md, last section); LoRA: half of seed 1's gain (seed 2
# rose by only +0.04 in 18 epochs, seed 3 is not measured yet: docs/learning.md, LoRA section)
MIN_GAIN = {"grpo": 0.05, "nft": 0.05, "grpo-lora": 0.05, "nft-lora": 0.1}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as tests/test_learning.py: the trajectory does not depend on the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _final_adapter_gain(tmp_path, method: str, trainer, name: str, before: dict) -> tuple[float, dict]:
    out = tmp_path / name
    tr = trainer(parse_args([*FLAGS[method], "--output_dir", str(out)]))
    assert tr.run() == "finished"
    rows = [r for r in read_metrics(str(out)) if r.get("phase") == "rl" and "reward/mean" in r]
    assert len(rows) == tr.cfg.max_train_steps and all(r["reward/failed"] == 0 for r in rows)
    ck = out / f"checkpoint-{tr.cfg.max_train_steps}"
    if tr.cfg.trainable == "lora":  # a LoRA checkpoint loads as its folder, its EMA as ema/
        after = _eval(tr.cfg, str(ck / "ema" if tr.cfg.use_ema else ck))
    else:
        after = _eval(tr.cfg, str(ck / ("ip-adapter-ema.safetensors" if tr.cfg.use_ema else "ip-adapter.safetensors")))
    return after["ocr"] - before["ocr"], after


def _eval(cfg, adapter) -> dict:
    return evaluate_ocr(cfg.pretrained_model_name_or_path, adapter, steps=cfg.rl_eval_num_inference_steps,
                        scale=cfg.ip_adapter_scale, data=cfg.train_data_json, images_per_prompt=EVAL_NOISES)


@pytest.mark.parametrize("method", ["grpo", "nft", "nft-lora", pytest.param("grpo-lora", marks=pytest.mark.skip(
    reason="GRPO LoRA: seeds 1-3 and controls not measured yet (docs/learning.md, LoRA section)"))])
def test_rl_raises_the_ocr_reward_of_the_pretrained_tiny_and_permuted_advantages_do_not(tmp_path, method):
    cfg = parse_args([*FLAGS[method], "--output_dir", str(tmp_path / "cfg")])
    before = _eval(cfg, cfg.initial_ip_adapter_path)
    assert before["n"] == 4 * EVAL_NOISES
    gain, after = _final_adapter_gain(tmp_path, method, Trainer, "real", before)
    g_perm, _ = _final_adapter_gain(tmp_path, method, PermutedAdvantages, "perm", before)
    print(f"{method}: OCR reward {before['ocr']:.4f} -> {after['ocr']:.4f} (gain {gain:+.4f}), control {g_perm:+.4f}")
    assert gain >= MIN_GAIN[method], f"OCR reward {before['ocr']:.3f} -> {after['ocr']:.3f} ({after['by_text']})"
    assert g_perm < 0.5 * gain, f"permuted advantages gained {g_perm:+.3f} vs the real run's {gain:+.3f}"
