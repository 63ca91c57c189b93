"""Console progress: the bar on a terminal, plain log lines elsewhere, the smoothed s/step and ETA."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

from calligrapher_rl.config import TrainConfig
from calligrapher_rl.config_parse import load_preset
from calligrapher_rl.training import ProgressCallback, Trainer
from calligrapher_rl.training.callbacks import StepTimer
from calligrapher_rl.training.progress import default_every, format_duration, progress_fields

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"resolution": 32, "num_eval_samples": 2, "rl_num_inference_steps": 4, "rl_eval_num_inference_steps": 4,
         "train_batch_size": 2, "rl_num_images_per_prompt": 2, "eval_steps": 0}
LINE = re.compile(r"^step (\d+)/4 phase (warmup|rl)( reward [\d.e+-]+)? loss [\d.e+-]+( kl [\d.e+-]+)? "
                  r"[\d.]+ s/step eta \d+ s$")


def test_the_line_format_and_the_smoothed_eta():
    timer = StepTimer(window=3)
    for step, t in [(0, 0.0), (1, 50.0), (9, 60.0), (10, 62.1), (11, 64.2), (12, 66.3)]:
        timer.mark(step, now=t)  # the slow early steps fall out of the window of the last 3 step ends
    row = {"reward/mean": 0.5123, "loss": 0.031, "kl": 0.0004}
    assert progress_fields(12, 30, "rl", row, timer) == "step 12/30 phase rl reward 0.512 loss 0.031 kl 0.0004 " \
                                                      "2.1 s/step eta 38 s"
    assert progress_fields(1, 30, "warmup", {"loss": float("nan")}, StepTimer()) == "step 1/30 phase warmup loss nan"
    assert [format_duration(s) for s in (38.4, 252, 7500)] == ["38 s", "4 min 12 s", "2 h 05 min"]
    assert (default_every(30), default_every(199), default_every(10000)) == (1, 1, 100)


def test_tty_bar_and_plain_lines_on_a_real_run(tmp_path, caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar, lines = ProgressCallback(stream=terminal), ProgressCallback(tty=False, every=2)
    cfg = TrainConfig(**{**load_preset("tiny-grpo"), **SMALL, "output_dir": str(tmp_path / "run"), "max_train_steps": 4,
                         "rl_warmup_steps": 1})
    with caplog.at_level(logging.INFO, logger="calligrapher_rl.training"):
        assert Trainer(cfg, callbacks=[bar, lines]).run() == "finished"
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [LINE.match(m).group(1, 2) for m in progress] == [("2", "rl"), ("4", "rl")], progress
    assert all(" reward " in m for m in progress)
    shown = terminal.getvalue()  # tqdm redraws the bar in place: the last drawing is after the last \r
    last = shown.rstrip("\n").split("\r")[-1]
    assert last.startswith("train 100%|") and re.search(r"step 4/4 phase \w+ reward [\d.]+ loss [\d.e+-]+ kl "
                                                         r"[\d.e+-]+ [\d.]+ s/step eta 0 s$", last.rstrip()), last
    assert "phase update" in shown and "phase rollout" in shown  # the live phase is shown as it changes


def test_a_command_line_run_without_a_terminal_logs_one_line_per_step(tmp_path):
    out = tmp_path / "run"
    args = ["--preset", "tiny-grpo", "--output_dir", str(out), "--max_train_steps", "4", "--rl_warmup_steps", "1",
            *[f"--{k}={v}" for k, v in SMALL.items()]]
    proc = subprocess.run([sys.executable, "-m", "calligrapher_rl.train", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    progress = [m.group(0) for m in re.finditer(r"step \d+/4 phase .*", proc.stderr)]
    assert [LINE.match(p).group(1, 2) for p in progress] == [("1", "warmup"), ("2", "rl"), ("3", "rl"), ("4", "rl")]
    assert not re.search(r"train +\d+%\|", proc.stderr)  # no training bar in a log
    logged = (out / "train.log").read_text()
    assert all(p in logged for p in progress)  # the studio tails train.log
