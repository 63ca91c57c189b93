"""The Python API: the docs' example runs, callbacks (order, payloads, stop, failure), Python rewards and
datasets, trackers through accelerate."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from calligrapher_rl.config import TrainConfig
from calligrapher_rl.config_parse import load_preset
from calligrapher_rl.errors import UserError
from calligrapher_rl.training import Trainer, TrainerCallback
from calligrapher_rl.training.run_dir import read_metrics, read_status

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"resolution": 32, "num_eval_samples": 2, "rl_num_inference_steps": 4, "rl_eval_num_inference_steps": 4,
         "train_batch_size": 2, "rl_num_images_per_prompt": 2}


def config(out, **overrides) -> TrainConfig:
    return TrainConfig(**{**load_preset("tiny-grpo"), **SMALL, "output_dir": str(out), **overrides})


def test_the_docs_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "library.md").read_text(), re.S)
    example = next(b for b in blocks if "Trainer(config" in b and "import" in b)
    assert example.count("tempfile.mkdtemp()") == 1
    example = example.replace("tempfile.mkdtemp()", repr(str(tmp_path)))  # a folder the test can inspect
    exec(compile(example, "docs/library.md", "exec"), {"__name__": "docs_example"})
    printed = capsys.readouterr().out.splitlines()
    rewards = eval(printed[0])  # noqa: S307 - the example prints a list of tuples
    assert [step for step, _, _ in rewards] == [2, 3, 4] and all(0 <= ink <= 1 for _, _, ink in rewards)
    assert eval(printed[1]) == [str(tmp_path / "run" / "checkpoint-4")]  # noqa: S307
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["rewards"] == "fidelity:0.5,ink:0.5" and run["train_data_json"] == "python:TextImageDataset"
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "reward/mean" in r]
    assert [(r["step"], r["reward/mean"], r["reward/ink"]) for r in rows] == rewards


class Recorder(TrainerCallback):
    """Records every event with its payload, and what status.json said at that moment."""

    def __init__(self):
        self.events = []

    def _add(self, trainer, event, **payload):
        self.events.append((event, payload, read_status(trainer.cfg.output_dir)))

    def on_train_begin(self, trainer):
        self._add(trainer, "train_begin", step=trainer.step)

    def on_phase(self, trainer, phase):
        self._add(trainer, "phase", phase=phase)

    def on_log(self, trainer, step, phase, logs):
        self._add(trainer, "log", step=step, phase=phase, logs=dict(logs))

    def on_step_end(self, trainer, step, phase, metrics):
        self._add(trainer, "step_end", step=step, phase=phase, metrics=dict(metrics))

    def on_evaluate(self, trainer, step, metrics, grid_path):
        self._add(trainer, "evaluate", step=step, metrics=dict(metrics), grid_path=grid_path)

    def on_save(self, trainer, step, path):
        self._add(trainer, "save", step=step, path=path)

    def on_train_end(self, trainer, state):
        self._add(trainer, "train_end", state=state)


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """4 steps (1 warmup + 3 RL), evaluation and checkpoints every 2, a Python dataset (plain dicts without
    masked_source) and a Python reward beside a registered one."""
    from calligrapher_rl.data import ensure_default_dataset, load_dataset

    out = tmp_path_factory.mktemp("api") / "run"
    items = [{k: v for k, v in it.items() if k in ("source", "mask", "reference", "text", "prompt")}
             for it in load_dataset(ensure_default_dataset(resolution=32), resolution=32)]

    def redness(images, prompts, metadata):
        assert len(images) == len(prompts) == len(metadata) and all(m["text"] == p for p, m in zip(prompts, metadata))
        return [im.getpixel((0, 0))[0] / 255 for im in images]

    recorder = Recorder()
    cfg = config(out, max_train_steps=4, rl_warmup_steps=1, eval_steps=2, checkpointing_steps=2)
    state = Trainer(cfg, rewards=["fidelity", (redness, 0.5)], dataset=items, callbacks=[recorder]).run()
    return out, state, recorder.events


def test_callbacks_see_every_event_in_order_with_their_payloads(recorded_run):
    out, state, events = recorded_run
    assert state == "finished"
    names = [e for e, _, _ in events]
    assert names[0] == "train_begin" and names[-1] == "train_end" and events[-1][1] == {"state": "finished"}
    compact = [(e, p.get("step", p.get("phase"))) for e, p, _ in events if e not in ("phase", "log")]
    assert compact == [("train_begin", 0), ("evaluate", 0), ("step_end", 1), ("step_end", 2), ("evaluate", 2),
                       ("save", 2), ("step_end", 3), ("step_end", 4), ("evaluate", 4), ("save", 4),
                       ("train_end", None)]
    # every row of metrics.jsonl went through on_log, in order, as written
    assert [p["logs"] for e, p, _ in events if e == "log"] == read_metrics(str(out))
    # a step's row is logged right before its step_end, which carries the same row
    for i, (e, p, _) in enumerate(events):
        if e == "step_end":
            assert events[i - 1][0] == "log" and events[i - 1][1]["logs"] == p["metrics"]
            assert p["phase"] == ("warmup" if p["step"] == 1 else "rl") and p["metrics"]["step"] == p["step"]
    rl = [p["metrics"] for e, p, _ in events if e == "step_end" and p["phase"] == "rl"]
    assert all({"reward/mean", "reward/fidelity", "reward/redness", "loss", "kl"} <= set(m) for m in rl)
    for e, p, _ in events:
        if e == "evaluate":
            assert set(p["metrics"]) == {"eval/reward/mean", "eval/reward/fidelity", "eval/reward/redness",
                                         "eval/reward/mean_lo", "eval/reward/mean_hi", "eval/n",  # its 95% interval
                                         "eval/preservation_mae", "eval/preservation_psnr"}
            assert Path(p["grid_path"]).name == f"step-{p['step']:06d}.png" and Path(p["grid_path"]).is_file()
        if e == "save":
            assert p["path"] == str(out / f"checkpoint-{p['step']}")
            assert (Path(p["path"]) / "ip-adapter.safetensors").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["rewards"] == "fidelity:1,redness:0.5" and run["train_data_json"] == "python:list"


def test_phases_and_eta_reach_status_json_as_they_happen(recorded_run):
    out, _, events = recorded_run
    phases = [p["phase"] for e, p, _ in events if e == "phase"]
    assert phases[:2] == ["evaluating", "warmup"] and {"rollout", "scoring", "update", "saving"} <= set(phases)
    assert phases.index("rollout") < phases.index("scoring") < phases.index("update")
    for e, p, status in events:
        if e == "phase":  # the built-in StatusCallback runs first: status.json already shows the phase
            assert status["phase"] == p["phase"] and status["state"] in ("running", "stopping")
        if e == "step_end":
            assert status["eta_s"] >= 0 and status["step"] <= p["step"]
    final = read_status(str(out))
    assert final["state"] == "finished" and "phase" not in final and "eta_s" not in final


def test_tensorboard_through_accelerate_has_the_scalars_and_grids(recorded_run):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    out, _, _ = recorded_run
    acc = EventAccumulator(str(out / "logs"), size_guidance={SCALARS: 0, IMAGES: 0})
    acc.Reload()
    rows = read_metrics(str(out))
    rl = [r for r in rows if "reward/mean" in r]
    assert [e.step for e in acc.Scalars("reward/redness")] == [r["step"] for r in rl] == [2, 3, 4]
    assert [e.value for e in acc.Scalars("reward/redness")] == pytest.approx([r["reward/redness"] for r in rl])
    assert [e.step for e in acc.Scalars("eval/reward/mean")] == [0, 2, 4]
    assert [e.step for e in acc.Images("samples")] == [0, 2, 4]


def test_report_to_none_and_wandb_missing(tmp_path):
    import importlib.util

    from calligrapher_rl.training.setup import tracker_names

    assert tracker_names("none") == [] and tracker_names("tensorboard") == ["tensorboard"]
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UserError, match=r"^--report_to: wandb is not installed \(pip install wandb\)"):
            Trainer(config(tmp_path / "w", report_to="wandb", max_train_steps=1))
        assert tracker_names("all") == ["tensorboard"]
    out = tmp_path / "none"
    assert Trainer(config(out, report_to="none", max_train_steps=1, eval_steps=0)).run() == "finished"
    assert read_metrics(str(out)) and not list((out / "logs").iterdir())


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, phase, metrics):
        if step >= self.step:
            trainer.stop()


class Broken(TrainerCallback):
    def on_step_end(self, trainer, step, phase, metrics):
        raise RuntimeError("my callback broke")


def test_a_callback_can_stop_the_run_and_a_broken_one_fails_it(tmp_path):
    out = tmp_path / "stop"
    assert Trainer(config(out, max_train_steps=10, eval_steps=0), callbacks=[StopAt(2)]).run() == "stopped"
    assert read_status(str(out))["step"] == 2 and (out / "checkpoint-2" / "ip-adapter.safetensors").is_file()
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="my callback broke"):
        Trainer(config(out, max_train_steps=3, eval_steps=0), callbacks=[Broken]).run()
    status = read_status(str(out))
    assert status["state"] == "failed" and status["message"] == "RuntimeError: my callback broke"


@pytest.mark.parametrize("kwargs, message", [
    (dict(rewards=[42]), r"^rewards: a reward must be a registered name, a Reward or a callable"),
    (dict(rewards=["nope"]), r"^--rewards: unknown reward 'nope' \(valid: brightness"),
    (dict(rewards=[lambda i, p, m: [], (lambda i, p, m: [], 2.0)]), r"^rewards: expected at least one reward, "
                                                                    r"each name once, got \['lambda', 'lambda'\]"),
    (dict(dataset=[]), r"^dataset: the dataset has no entries"),
    (dict(dataset=[{"source": 0}]), r"^dataset: item 0 has no 'mask'"),
    (dict(callbacks=[object()]), r"object has none of the callback methods"),
])
def test_bad_python_inputs_are_one_line(tmp_path, kwargs, message):
    if "dataset" in kwargs and kwargs["dataset"]:
        import torch

        kwargs["dataset"][0].update(source=torch.zeros(3, 32, 32))
    with pytest.raises((UserError, TypeError), match=message):
        Trainer(config(tmp_path / "bad", max_train_steps=1), **kwargs).run()
    status = read_status(str(tmp_path / "bad"))
    assert status is None or status["state"] == "failed"


def test_callable_reward_nan_and_none_are_failures_not_zeros():
    from PIL import Image

    from calligrapher_rl.rewards import RewardSample, build_rewards

    sample = RewardSample(image=Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8), 255), text="a")
    with build_rewards([lambda images, prompts, metadata: [None, math.nan, 0.25]]) as rs:
        scores = rs.score([sample] * 3)
    assert math.isnan(scores["lambda"][0]) and math.isnan(scores["total"][1]) and scores["total"][2] == 0.25


def test_one_reward_spec_parser_for_the_config_and_the_registry():
    from calligrapher_rl.config import parse_reward_spec
    from calligrapher_rl.rewards import parse_spec

    assert parse_spec("ocr:0.7, style:0.3") == parse_reward_spec("ocr:0.7, style:0.3") == {"ocr": 0.7, "style": 0.3}
    def message(parse, spec):
        with pytest.raises(UserError) as exc:
            parse(spec)
        return str(exc.value)

    for bad in ("ocr:abc", "ocr,,style", "ocr,ocr:2", "OCR 1", "ocr:0"):
        assert message(parse_reward_spec, bad) == message(parse_spec, bad)
        assert message(parse_spec, bad).startswith("--rewards: ")
    assert message(parse_spec, "").startswith(message(parse_reward_spec, "").split(", got")[0] + " (valid: brightness")
    with pytest.raises(UserError, match=r"^--rewards: unknown reward 'nope' \(valid: brightness, fidelity, ocr"):
        parse_spec("ocr,nope")
    assert parse_reward_spec("ocr,nope") == {"ocr": 1.0, "nope": 1.0}  # the config checks syntax only
