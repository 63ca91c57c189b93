"""Learning on the real reward: GRPO on the pretrained tiny raises the OCR reward; permuted advantages do not.

The run is the real trainer in-process on `tiny-pretrained` with the `ocr` reward (RapidOCR), on the
presets' `bundled-glyphs` (4 one- and two-character examples, unseen in pretraining), so that every
epoch scores the same prompts and `reward/mean` carries no prompt-sampling noise. The paired control is
the same run, same seed, with each epoch's advantages randomly permuted across its images: the same update sizes, no
information about which image read right. It must not learn. Settings and thresholds: docs/learning.md
(last section). The trainer is deterministic on CPU, so this is seed 1's trajectory exactly; seeds 2 and 3
did not learn in 10 epochs (docs/learning.md), so the test guards the pipeline's ability to learn from
the OCR signal, not the robustness of learning across seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calligrapher_rl.config import parse_args
from calligrapher_rl.training import trainer as trainer_module
from calligrapher_rl.training.run_dir import read_metrics

pytestmark = pytest.mark.slow

EPOCHS = 10
K = 3  # epochs averaged at each end


def _run(tmp_path, data: str, name: str) -> list[float]:
    out = str(tmp_path / name)
    args = ["--preset", "tiny-grpo", "--train_data_json", data, "--output_dir", out, "--seed", "1",
            "--train_batch_size", "4", "--rl_num_images_per_prompt", "8", "--rl_num_batches_per_epoch", "1",
            "--max_train_steps", str(EPOCHS), "--learning_rate", "1e-2", "--trainable", "attn",
            "--ip_adapter_scale", "1.0", "--rl_warmup_steps", "0", "--use_ema", "false", "--eval_steps", "0",
            "--eval_at_start", "false", "--checkpointing_steps", "100000", "--report_to", "none",
            "--rewards", "ocr:1.0"]
    assert trainer_module.train(parse_args(args)) == "finished"
    return [r["reward/mean"] for r in read_metrics(out) if "reward/mean" in r]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_grpo_raises_ocr_reward_and_permuted_advantages_do_not(tmp_path, monkeypatch):
    data = "bundled-glyphs"  # the presets' 4 short examples: KC, 3, 8, 9H
    learned = _run(tmp_path, data, "grpo")

    original = trainer_module.Trainer._advantages
    gen = torch.Generator().manual_seed(0)

    def permuted(self, batches, scores):
        adv = original(self, batches, scores)
        flat = torch.cat(adv)
        flat = flat[torch.randperm(len(flat), generator=gen)]
        return list(flat.split([len(a) for a in adv]))

    monkeypatch.setattr(trainer_module.Trainer, "_advantages", permuted)
    control = _run(tmp_path, data, "control")

    gain = np.mean(learned[-K:]) - np.mean(learned[:K])
    control_gain = np.mean(control[-K:]) - np.mean(control[:K])
    assert len(learned) == len(control) == EPOCHS
    assert gain >= 0.10, (learned, control)
    assert control_gain <= 0.05, (learned, control)
    assert gain - control_gain >= 0.10, (learned, control)
