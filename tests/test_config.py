"""The training configuration: guide flags, presets, precedence, validation, run.json."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from calligrapher_rl import __version__
from calligrapher_rl.config import SEED_GUIDE_FLAGS, VERSION_KEY, ConfigError, TrainConfig, parse_reward_spec
from calligrapher_rl.config_parse import PRESETS_DIR, build_parser, list_presets, load_preset, parse_args
from calligrapher_rl.errors import UserError, cli_main

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "RL_TRAINING_GUIDE.zh.md"
PATHS = ["--pretrained_model_name_or_path", "m", "--siglip_path", "s", "--train_data_json", "d.jsonl",
         "--output_dir", "out"]
PRESETS = ("tiny-grpo", "tiny-nft", "flux-grpo", "flux-nft", "tiny-awm", "flux-awm", "tiny-grpo-fast", "flux-grpo-fast")

# a sample value for every flag of the guide, and what it must become in the config
SAMPLES = {
    "model_type": ("flux", "flux"),
    "pretrained_model_name_or_path": ("/p/FLUX.1-Fill-dev", "/p/FLUX.1-Fill-dev"),
    "siglip_path": ("/p/siglip", "/p/siglip"),
    "train_data_json": ("/p/data.json", "/p/data.json"),
    "output_dir": ("/p/out", "/p/out"),
    "resolution": ("256", 256),
    "train_batch_size": ("3", 3),
    "gradient_accumulation_steps": ("4", 4),
    "learning_rate": ("2e-5", 2e-5),
    "max_train_steps": ("1234", 1234),
    "mixed_precision": ("bf16", "bf16"),
    "gradient_checkpointing": (None, True),
    "offload_text_encoder_two": (None, True),
    "use_rl": (None, True),
    "rl_method": ("nft", "nft"),
    "rl_warmup_steps": ("500", 500),
    "rl_num_images_per_prompt": ("4", 4),
    "rl_num_batches_per_epoch": ("2", 2),
    "rl_num_inference_steps": ("30", 30),
    "rl_guidance_scale": ("4.0", 4.0),
    "rl_timestep_fraction": ("0.8", 0.8),
    "rl_num_inner_epochs": ("3", 3),
    "rl_adv_clip_max": ("3.0", 3.0),
    "rl_per_prompt_stat_tracking": (None, True),
    "rl_grpo_clip_range": ("0.1", 0.1),
    "rl_kl_beta": ("0.05", 0.05),
    "nft_beta": ("0.3", 0.3),
    "nft_adv_mode": ("binary", "binary"),
    "nft_decay_type": ("2", 2),
    "use_ema": (None, True),
    "ema_decay": ("0.999", 0.999),
    "ema_update_interval": ("2", 2),
    "checkpointing_steps": ("250", 250),
    "report_to": ("none", "none"),
    "initial_ip_adapter_path": ("/p/calligrapher.bin", "/p/calligrapher.bin"),
}


def cfg(**overrides) -> TrainConfig:
    base = dict(pretrained_model_name_or_path="m", siglip_path="s", train_data_json="d", output_dir="o")
    return TrainConfig(**{**base, **overrides})


# --- the guide's flags -------------------------------------------------------------------------------------
def test_seed_guide_flags_are_fields_with_help():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(SAMPLES) == set(SEED_GUIDE_FLAGS)
    for name in SEED_GUIDE_FLAGS:
        assert name in fields, name
    for f in fields.values():
        assert f.metadata.get("help"), f.name


@pytest.mark.skipif(not GUIDE.exists(), reason="seed guide not present")
def test_seed_guide_flags_match_the_guide():
    found = set(re.findall(r"--([a-z][a-z0-9_]+)", GUIDE.read_text(encoding="utf-8")))
    found -= {"help", "logdir", "port"}  # argparse's and tensorboard's
    assert found == set(SEED_GUIDE_FLAGS)


@pytest.mark.parametrize("name", SEED_GUIDE_FLAGS)
def test_each_seed_flag_parses(name):
    text, expected = SAMPLES[name]
    argv = PATHS + [f"--{name}"] + ([] if text is None else [text])
    c = parse_args(argv, validate=False)
    assert getattr(c, name) == expected


def test_all_seed_flags_together_validate():
    argv = []
    for name, (text, _) in SAMPLES.items():
        argv += [f"--{name}"] + ([] if text is None else [text])
    c = parse_args(argv)
    for name, (_, expected) in SAMPLES.items():
        assert getattr(c, name) == expected, name


@pytest.mark.skipif(not GUIDE.exists(), reason="seed guide not present")
def test_guide_production_commands_parse():
    text = GUIDE.read_text(encoding="utf-8")
    blocks = re.findall(r"python -m train\.train \\\n(.*?)```", text, flags=re.S)
    prod = [b for b in blocks if "--rl_num_images_per_prompt 4" in b]
    assert len(prod) == 2
    for block in prod:
        argv = shlex.split(block.replace("\\\n", " "))
        c = parse_args(argv)
        assert c.use_rl and c.rl_num_images_per_prompt == 4 and c.use_ema


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in out, f.name
    assert "default: 0.9999" in out and "--preset" in out


def test_bool_flags_bare_and_explicit():
    assert parse_args(PATHS + ["--use_ema"], validate=False).use_ema is True
    assert parse_args(PATHS + ["--use_ema", "false"], validate=False).use_ema is False
    assert parse_args(PATHS, validate=False).eval_at_start is True
    assert parse_args(PATHS + ["--eval_at_start", "no"], validate=False).eval_at_start is False
    c = parse_args(PATHS + ["--use_rl", "--rl_method", "grpo", "--rl_num_images_per_prompt", "4"])
    assert c.use_rl and c.rl_method == "grpo"


def test_defaults_are_the_guides():
    c = TrainConfig()
    assert (c.model_type, c.resolution, c.train_batch_size, c.learning_rate) == ("flux", 512, 1, 1e-4)
    assert (c.rl_warmup_steps, c.rl_num_images_per_prompt, c.rl_num_inference_steps) == (1000, 1, 50)
    assert (c.rl_guidance_scale, c.rl_timestep_fraction, c.rl_adv_clip_max, c.rl_grpo_clip_range) == (3.5, 1.0, 5.0, 0.2)
    assert (c.nft_beta, c.nft_adv_mode, c.nft_decay_type) == (0.5, "normal", 0)
    assert (c.use_ema, c.ema_decay, c.ema_update_interval, c.checkpointing_steps) == (False, 0.9999, 1, 500)
    assert c.use_rl is False and c.rl_method == "grpo" and c.report_to == "tensorboard"


def test_unknown_flag_is_a_user_error():
    with pytest.raises(UserError, match="--no_such_flag"):
        parse_args(PATHS + ["--no_such_flag", "1"])
    with pytest.raises(UserError, match="invalid choice"):
        parse_args(PATHS + ["--rl_method", "ppo"])


# --- presets -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    assert name in list_presets()
    values = load_preset(name)
    assert values and "preset" not in values
    c = parse_args(["--preset", name])
    assert c.use_rl and c.preset == name
    for key, value in values.items():
        assert getattr(c, key) == value, key
    assert c.rl_method == name.split("-")[1]
    TrainConfig.from_json(c.to_json()).validate()


def test_tiny_presets_are_the_cpu_default():
    for name in ("tiny-grpo", "tiny-nft", "tiny-awm", "tiny-grpo-fast"):
        c = parse_args(["--preset", name])
        assert (c.pretrained_model_name_or_path, c.siglip_path, c.train_data_json) == (
            "tiny-pretrained", "tiny-pretrained", "bundled-glyphs")  # the shipped tiny that writes
        assert c.resolution == 64 and c.mixed_precision == "no" and c.rewards == "ocr:1.0"
        assert c.output_dir == f"runs/{name}"


def test_preset_by_path_and_flag_precedence(tmp_path):
    c = parse_args(["--preset", "tiny-grpo", "--learning_rate", "5e-4", "--use_ema", "false"])
    assert c.learning_rate == 5e-4 and c.use_ema is False  # typed flags win
    assert c.max_train_steps == 35  # untyped: the preset's value
    assert c.adam_beta1 == 0.9  # in neither: the default
    # a flag typed before --preset still wins; 'none' clears an optional value
    p = tmp_path / "mine.toml"
    p.write_text('pretrained_model_name_or_path = "tiny"\nsiglip_path = "tiny"\ntrain_data_json = "bundled"\n'
                 'output_dir = "x"\ncheckpoints_total_limit = 3\nlearning_rate = 1\n')
    c = parse_args(["--seed", "7", "--preset", str(p), "--checkpoints_total_limit", "none"])
    assert c.seed == 7 and c.checkpoints_total_limit is None and c.learning_rate == 1.0


def test_bad_preset_key_and_type(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('learning_rat = 1e-4\n')
    with pytest.raises(UserError) as exc:
        parse_args(["--preset", str(p)])
    assert str(p) in str(exc.value) and "learning_rat" in str(exc.value)
    p.write_text('resolution = "512"\n')
    with pytest.raises(UserError) as exc:
        load_preset(p)
    assert str(p) in str(exc.value) and "resolution" in str(exc.value) and "int" in str(exc.value)
    p.write_text('use_rl = "yes"\n')
    with pytest.raises(UserError, match="use_rl.*bool"):
        load_preset(p)
    p.write_text('resolution = [\n')
    with pytest.raises(UserError, match="cannot parse"):
        load_preset(p)
    with pytest.raises(UserError, match="unknown preset 'nope'.*tiny-grpo"):
        parse_args(["--preset", "nope"])
    with pytest.raises(UserError, match="no such preset file"):
        parse_args(["--preset", str(tmp_path / "missing.toml")])


def test_bad_value_in_preset_names_the_file(tmp_path):
    p = tmp_path / "v.toml"
    p.write_text((PRESETS_DIR / "tiny-grpo.toml").read_text().replace("resolution = 64", "resolution = 50"))
    with pytest.raises(UserError) as exc:
        parse_args(["--preset", str(p)])
    assert str(p) in str(exc.value) and "--resolution" in str(exc.value)


def test_run_json_can_be_a_preset(tmp_path):
    c = parse_args(["--preset", "tiny-nft"])
    p = tmp_path / "run.json"
    p.write_text(c.to_json())
    again = parse_args(["--preset", str(p)])
    assert dataclasses.replace(again, preset=c.preset) == c


# --- validation --------------------------------------------------------------------------------------------
BAD = [
    (dict(resolution=50), "resolution"),
    (dict(resolution=16), "resolution"),
    (dict(train_batch_size=0), "train_batch_size"),
    (dict(max_train_steps=0), "max_train_steps"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(rl_timestep_fraction=0.0), "rl_timestep_fraction"),
    (dict(rl_timestep_fraction=1.5), "rl_timestep_fraction"),
    (dict(rl_num_inference_steps=4, rl_timestep_fraction=0.2), "rl_timestep_fraction"),
    (dict(rl_grpo_clip_range=0.0), "rl_grpo_clip_range"),
    (dict(nft_beta=0.0), "nft_beta"),
    (dict(rl_method="ppo"), "rl_method"),
    (dict(use_rl=True, rl_num_images_per_prompt=1), "rl_num_images_per_prompt"),
    (dict(use_rl=True, rl_num_images_per_prompt=4, rl_noise_level=0.0), "rl_noise_level"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(ema_decay=-0.1), "ema_decay"),
    (dict(rewards="ocr:abc"), "rewards"),
    (dict(rewards="ocr:1,ocr:2"), "rewards"),
    (dict(rewards=""), "rewards"),
    (dict(rewards="ocr:"), "rewards"),
    (dict(rewards="ocr:0,style:0"), "rewards"),
    (dict(rewards="OCR 1"), "rewards"),
    (dict(checkpoints_total_limit=0), "checkpoints_total_limit"),
    (dict(rl_sde_window_size=60), "rl_sde_window_size"),
    (dict(rl_num_inference_steps=10, rl_sde_window_size=2, rl_sde_window_range="4,5"), "rl_sde_window_range"),
    (dict(rl_num_inference_steps=10, rl_sde_window_size=2, rl_sde_window_range="0,11"), "rl_sde_window_range"),
    (dict(rl_sde_window_size=2, rl_sde_window_range="a-b"), "rl_sde_window_range"),
    (dict(nft_decay_type=3), "nft_decay_type"),
    (dict(nft_adv_mode="sign"), "nft_adv_mode"),
    (dict(nft_num_timesteps=51), "nft_num_timesteps"),
    (dict(rl_kl_beta=-1.0), "rl_kl_beta"),
    (dict(rl_adv_clip_max=0.0), "rl_adv_clip_max"),
    (dict(rl_sde_type="cps", rl_noise_level=1.5), "rl_noise_level"),
    (dict(rl_reward_failure_limit=1.5), "rl_reward_failure_limit"),
    (dict(reward_server_url="localhost:8000"), "reward_server_url"),
    (dict(trainable="loras"), "trainable"),
    (dict(resolution="512"), "resolution"),
    (dict(use_rl="yes"), "use_rl"),
    (dict(output_dir=None), "output_dir"),
    (dict(pretrained_model_name_or_path=""), "pretrained_model_name_or_path"),
    (dict(seed=-1), "seed"),
    (dict(eval_steps=-1), "eval_steps"),
    (dict(adam_beta2=1.0), "adam_beta2"),
    (dict(rl_method="awm", rl_num_inference_steps=4, awm_num_timesteps=4), "awm_num_timesteps"),
    (dict(rl_method="awm", awm_num_timesteps=0), "awm_num_timesteps"),
    (dict(awm_weighting="elbo"), "awm_weighting"),
    (dict(awm_ghuber_power=0.0), "awm_ghuber_power"),
    (dict(awm_advantage_max=-1.0), "awm_advantage_max"),
    (dict(awm_clip_range=0.0), "awm_clip_range"),
    (dict(awm_ema_kl_beta=-0.5), "awm_ema_kl_beta"),
    (dict(awm_ema_kl_decay=1.5), "awm_ema_kl_decay"),
    (dict(awm_ema_kl_decay_type="cosine"), "awm_ema_kl_decay_type"),
    (dict(rl_grpo_ratio_norm=True, rl_sde_type="cps"), "rl_grpo_ratio_norm"),
    (dict(rollout_fp8_scales="block"), "rollout_fp8_scales"),
    (dict(rollout_fp8_scales="tensor"), "rollout_fp8_scales"),  # without --rollout_fp8: read by nothing
    (dict(rollout_fp8=True, rollout_fp8_attention="flash3"), "rollout_fp8_attention"),
    (dict(rollout_fp8_attention="cudnn"), "rollout_fp8_attention"),
    (dict(rollout_fp8_fused_qkv=True), "rollout_fp8_fused_qkv"),
]


@pytest.mark.parametrize("overrides,flag", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_validate_rejects(overrides, flag):
    with pytest.raises(ConfigError) as exc:
        cfg(**overrides).validate()
    msg = str(exc.value)
    assert exc.value.flag == flag
    assert msg.startswith(f"--{flag}: ") and "\n" not in msg
    assert isinstance(exc.value, UserError)


def test_validate_accepts_good_values():
    cfg().validate()
    cfg(use_rl=True, rl_num_images_per_prompt=2, rl_method="nft", rl_noise_level=0.0).validate()
    cfg(rl_num_inference_steps=10, rl_sde_window_size=2, rl_sde_window_range="0,5").validate()
    cfg(rewards="ocr", reward_server_url="http://127.0.0.1:8000,https://h:1").validate()
    cfg(learning_rate=1).validate()  # an int where a float is expected is fine
    cfg(rollout_fp8=True, rollout_fp8_scales="tensor", rollout_fp8_attention="cudnn", rollout_fp8_fused_qkv=True).validate()


def test_cli_main_prints_one_line(capsys):
    def main(argv):
        parse_args(argv)

    with pytest.raises(SystemExit) as exc:
        cli_main(main, PATHS + ["--resolution", "50"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resolution" in err and "multiple of 16" in err


def test_reward_spec():
    assert parse_reward_spec("ocr:0.7, style:0.3") == {"ocr": 0.7, "style": 0.3}
    assert parse_reward_spec("fidelity") == {"fidelity": 1.0}
    assert cfg(rewards="ocr:2,style:-1").reward_weights() == {"ocr": 2.0, "style": -1.0}


def test_warnings():
    assert cfg().warnings() and any("30" in w for w in cfg().warnings())
    assert parse_args(["--preset", "tiny-grpo"]).warnings() == []
    w = cfg(use_rl=True, rl_num_images_per_prompt=4, max_train_steps=100).warnings()
    assert any("no RL step" in x for x in w)


# --- derived values and run.json ---------------------------------------------------------------------------
def test_kl_beta_resolution_per_method():
    assert cfg(rl_method="grpo").resolved().rl_kl_beta == 0.1
    assert cfg(rl_method="nft").resolved().rl_kl_beta == 0.01
    assert cfg(rl_method="nft", rl_kl_beta=0.0).resolved().rl_kl_beta == 0.0
    assert cfg(rl_method="awm").resolved().rl_kl_beta == 0.003  # AWM's authors' OCR value
    assert parse_args(PATHS + ["--rl_method", "nft"]).rl_kl_beta == 0.01
    assert parse_args(PATHS + ["--rl_kl_beta", "0.2"]).rl_kl_beta == 0.2
    assert TrainConfig().rl_kl_beta is None  # unresolved until resolved()


def test_other_derived_values():
    r = cfg(rl_num_inference_steps=10, rl_sde_window_size=2).resolved()
    assert r.rl_eval_num_inference_steps == 10 and r.rl_sde_window_range == "0,5"
    assert r.sde_window() == (0, 5) and r.num_trained_timesteps() == 2
    assert cfg(rl_num_inference_steps=10, rl_timestep_fraction=0.5).num_trained_timesteps() == 5
    assert cfg(rl_method="nft", rl_num_inference_steps=10, rl_timestep_fraction=0.5).resolved().nft_num_timesteps == 5
    # AWM: min(6, room) with room = int(N x fraction) - 1 (index 0, pure noise, is never trained)
    assert cfg(rl_method="awm", rl_num_inference_steps=14, rl_timestep_fraction=0.9).num_trained_timesteps() == 6
    assert cfg(rl_method="awm", rl_num_inference_steps=4).num_trained_timesteps() == 3
    assert cfg().resolved().num_style_tokens == 128
    assert cfg(initial_ip_adapter_path="x.bin").resolved().num_style_tokens is None  # read from the file
    assert cfg(rl_eval_num_inference_steps=30).resolved().rl_eval_num_inference_steps == 30
    r = cfg(rl_method="nft").resolved()
    assert r.resolved() == r  # idempotent


def test_run_json_round_trip():
    c = parse_args(["--preset", "flux-grpo", "--seed", "3"])
    data = json.loads(c.to_json())
    assert data[VERSION_KEY] == __version__
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(data)
    assert data["rl_kl_beta"] == 0.04 and data["preset"] == "flux-grpo"
    back = TrainConfig.from_json(c.to_json())
    assert back == c.resolved()
    assert TrainConfig.from_json(data) == back
    with pytest.raises(UserError, match="run.json: bogus"):
        TrainConfig.from_json({**data, "bogus": 1})
    with pytest.raises(UserError, match="max_train_steps.*int"):
        TrainConfig.from_json({**data, "max_train_steps": "10"})
    with pytest.raises(UserError, match="not valid JSON"):
        TrainConfig.from_json("{")


@pytest.mark.parametrize("extra", [["--rl_sde_window_size", "1", "--rl_sde_window_range", "0,4"],
                                   ["--rl_sde_window_size", "4"], ["--rl_sde_window_size", "3", "--rl_sde_window_range", "1,4"]])
def test_sde_window_without_room_is_a_one_line_error(extra):
    """The last step (into sigma 0) is never stochastic: a window must fit in steps [lo, hi) with hi <= N - 1."""
    with pytest.raises(ConfigError) as exc:
        parse_args([*PATHS, "--rl_num_inference_steps", "4", *extra])
    assert "\n" not in str(exc.value) and "last step is never stochastic" in str(exc.value)
    assert exc.value.flag in ("rl_sde_window_size", "rl_sde_window_range")
    parse_args([*PATHS, "--rl_num_inference_steps", "4", "--rl_sde_window_size", "1", "--rl_sde_window_range", "0,3"])


def test_flags_read_by_nothing_are_gone_and_old_run_json_still_loads(tmp_path):
    for flag in ("--dataloader_num_workers", "--tiny_width", "--use_context"):
        with pytest.raises(UserError):
            parse_args([*PATHS, flag, "1"])
    old = json.loads(cfg().to_json())
    old.update(dataloader_num_workers=0, tiny_width=None, use_context=False)
    assert TrainConfig.from_json(json.dumps(old)) == TrainConfig.from_json(cfg().to_json())
    (tmp_path / "run.json").write_text(json.dumps(old))
    assert "use_context" not in load_preset(str(tmp_path / "run.json"))


def test_every_config_field_is_read_by_the_run():
    """Every field of the config, not only the guide's, is read by code outside the config modules
    (directly as cfg.<field>, or through the helper named here): no flag that does nothing."""
    root = Path(__file__).resolve().parents[1] / "calligrapher_rl"
    sources = "".join(p.read_text() for p in root.rglob("*.py") if not p.name.startswith("config"))
    via_helper = {"rl_timestep_fraction": "num_trained_timesteps()", "nft_num_timesteps": "num_trained_timesteps()",
                  "awm_num_timesteps": "num_trained_timesteps()",
                  "rl_sde_window_range": "sde_window()", "rewards": "cfg.rewards", "preset": "parse_args("}
    for name in dataclasses.fields(TrainConfig):
        used = re.search(rf"cfg\.{name.name}\b", sources) or (name.name in via_helper and via_helper[name.name] in sources)
        assert used, f"--{name.name} is parsed but never used"


def test_fp16_and_nonfinite_limit_flags():
    assert parse_args([*PATHS, "--mixed_precision", "fp16"]).mixed_precision == "fp16"  # the guide's examples use it
    assert parse_args(PATHS).max_nonfinite_steps == 5
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        parse_args([*PATHS, "--max_nonfinite_steps", "0"])
