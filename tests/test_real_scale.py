"""What a real-size run depends on, checked on the tiny model and the meta device: per-phase metrics, lean
checkpoints (no tensor twice, the reference once per run), out of memory as one line, the real-size builder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.errors import UserError
from calligrapher_rl.training.run_dir import read_metrics, read_status
from calligrapher_rl.training.trainer import Trainer

FAST = ["--pretrained_model_name_or_path", "tiny", "--siglip_path", "tiny", "--train_data_json", "bundled",
        "--rewards", "fidelity:1.0", "--rl_num_images_per_prompt", "4", "--train_batch_size", "4",
        "--resolution", "32", "--rl_num_inference_steps", "4", "--rl_eval_num_inference_steps", "2",
        "--num_eval_samples", "2", "--num_style_tokens", "8", "--rl_num_batches_per_epoch", "2",
        "--gradient_accumulation_steps", "2", "--trainable", "all", "--rl_warmup_steps", "0"]


def _run(out, *extra, preset="tiny-grpo"):
    return Trainer(parse_args(["--preset", preset, "--output_dir", str(out), *FAST, *extra])).run()


def _keys(path):
    with safe_open(str(path), "pt") as fh:
        return set(fh.keys())


@pytest.mark.parametrize("preset", ["tiny-grpo", "tiny-nft"])
def test_every_epoch_says_where_its_seconds_went_and_checkpoints_hold_each_tensor_once(tmp_path, preset):
    out = tmp_path / "run"
    extra = ["--nft_decay_type", "2"] if preset == "tiny-nft" else []  # flux-nft's: eta 0 for 75 RL steps
    assert _run(out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--eval_steps", "2", *extra,
                preset=preset) == "finished"
    rows = read_metrics(str(out))
    rl = [r for r in rows if "reward/mean" in r]
    assert len(rl) == 2
    for r in rl:
        for phase in ("rollout", "reward", "update", "optimizer", "ema", "epoch"):
            assert r[f"time/{phase}_s"] > 0, (phase, r)
        assert r["time/epoch_s"] >= r["time/rollout_s"] + r["time/update_s"]  # nested phases are not counted twice
        assert r["perf/update_tflops"] > 0 and r["perf/rollout_tflops"] > 0 and r["perf/images_per_s"] > 0
        steps = 2 * 16 * 4  # FAST: 2 rollout batches of 4 prompts x 4 images, 4 sampler steps each
        assert r["perf/rollout_ms_per_image_step"] == pytest.approx(1000 * r["time/rollout_s"] / steps)
        # the sampler's own share: inside the rollout phase (decoding and reward submission are the rest)
        assert 0 < r["perf/sampler_ms_per_image_step"] < r["perf/rollout_ms_per_image_step"]
        assert r["sys/host_peak_rss_gib"] > 0 and r["sys/host_available_gib"] > 0  # host memory, on every device
    assert rl[0]["time/load_s"] > 0 and rl[0]["time/first_step_s"] >= rl[0]["time/load_s"]
    assert "time/first_step_s" not in rl[1]
    # evaluation and checkpoint time is charged to the epoch after them (checkpoint-1 and the step-0 evaluation)
    assert rl[1]["time/checkpoint_save_s"] > 0 and rl[0]["time/eval_s"] > 0
    assert [r["step"] for r in rows if "reward/mean" in r or "time/epoch_s" in r] == [1, 2]  # no row repeats a step

    adapter = _keys(out / "checkpoint-2" / "ip-adapter.safetensors")
    for step in (1, 2):
        ck = out / f"checkpoint-{step}"
        assert _keys(ck / "ip-adapter-ema.safetensors") == adapter  # the EMA lives in its own file only...
        # ...and the reference is the run's initial adapter, rebuilt on resume: neither is in trainer_state, nor
        # (DiffusionNFT's old policy equals the adapter in its first steps) the old policy
        assert not (ck / "trainer_state" / "policies.safetensors").exists()
        state = json.loads((ck / "trainer_state" / "state.json").read_text())
        assert state["reference"] == {"initial": True, "initial_ip_adapter_path": None}
    assert not (out / "reference.safetensors").exists()


def test_a_reference_taken_after_warmup_is_written_once_and_resumes_exactly(tmp_path):
    args = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--eval_steps", "0", "--rl_warmup_steps", "1",
            "--rl_kl_beta", "0.5"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(a, *args) == "finished"
    assert _keys(a / "reference.safetensors") and not (a / "checkpoint-2" / "trainer_state" / "policies.safetensors").exists()
    assert _run(b, "--max_train_steps", "2", *args[2:]) == "finished"  # ends at step 2, then resumes to 3
    assert _run(b, *args, "--resume_from_checkpoint", "latest") == "finished"
    pick = lambda rows: [(r["step"], r["kl"], r["loss"]) for r in rows if "kl" in r]  # noqa: E731
    assert pick(read_metrics(str(b))) == pick(read_metrics(str(a))) and pick(read_metrics(str(a)))


def test_averages_written_in_bf16_halve_their_files_and_a_resume_goes_on_within_bf16(tmp_path):
    """--checkpoint_averages_dtype bf16 (the flux presets): the EMA and NFT's old policy (here lagging: decay
    type 1) are written in bf16, the trained weights in fp32; a resume continues with the next step's loss
    within bf16 tolerance of the uninterrupted run's (fp32 files: exactly, the other resume tests)."""
    args = ["--checkpointing_steps", "2", "--eval_steps", "0", "--nft_decay_type", "1", "--use_ema", "true",
            "--ema_decay", "0.9", "--checkpoint_averages_dtype", "bf16"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(a, "--max_train_steps", "3", *args, preset="tiny-nft") == "finished"
    assert _run(b, "--max_train_steps", "2", *args, preset="tiny-nft") == "finished"
    ck = b / "checkpoint-2"
    dtypes = {f: {v.dtype for v in load_file(ck / f).values()} for f in
              ("ip-adapter.safetensors", "ip-adapter-ema.safetensors", "trainer_state/policies.safetensors")}
    assert dtypes == {"ip-adapter.safetensors": {torch.float32}, "ip-adapter-ema.safetensors": {torch.bfloat16},
                      "trainer_state/policies.safetensors": {torch.bfloat16}}
    assert (ck / "ip-adapter-ema.safetensors").stat().st_size < 0.51 * (ck / "ip-adapter.safetensors").stat().st_size
    assert _run(b, "--max_train_steps", "3", *args, "--resume_from_checkpoint", "latest", preset="tiny-nft") == "finished"
    pick = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}  # noqa: E731
    want, got = pick(read_metrics(str(a))), pick(read_metrics(str(b)))
    assert sorted(got) == sorted(want) == [1, 2, 3] and got[2] == want[2]
    assert got[3] == pytest.approx(want[3], rel=1e-4) and abs(want[3] - want[2]) > 100 * abs(got[3] - want[3])


class _OutOfMemoryIn:
    """Raises what torch raises when a CUDA allocation fails, in the given phase (no card needed)."""

    def __init__(self, phase):
        self.phase = phase

    def on_phase(self, trainer, phase):
        if phase == self.phase:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.50 GiB")


def test_out_of_memory_ends_failed_with_one_line_naming_the_phase_and_the_flags(tmp_path):
    out = tmp_path / "run"
    cfg = parse_args(["--preset", "tiny-grpo", "--output_dir", str(out), *FAST, "--max_train_steps", "2",
                      "--rl_num_images_per_prompt", "8"])
    with pytest.raises(UserError) as err:
        Trainer(cfg, callbacks=[_OutOfMemoryIn("update")]).run()
    msg = str(err.value)
    assert "\n" not in msg and "out of GPU memory in the update phase" in msg
    assert "--trainable lora" in msg and "--rl_num_images_per_prompt 4" in msg
    status = read_status(str(out))
    assert status["state"] == "failed" and "out of GPU memory in the update phase" in status["message"]


def test_the_real_size_builder_has_the_published_parameter_counts():
    from calligrapher_rl.models.realsize import parameter_counts

    n = parameter_counts()  # meta device: no memory
    assert round(n["transformer"] / 1e9, 1) == 11.9  # FLUX.1-Fill-dev
    assert round(n["t5_encoder"] / 1e9, 2) == 4.76 and round(n["clip_text"] / 1e6) == 123
    assert round(n["siglip_vision"] / 1e6) == 428  # so400m's vision tower
    assert round(n["adapter"] / 1e9, 1) == 3.0 and round(n["adapter_attn"] / 1e9, 2) == 1.43  # the release's adapter


def test_flops_are_counted_at_the_run_shapes(tiny_stack):
    from calligrapher_rl.training.timing import transformer_flops_per_image

    t = tiny_stack.pipe.transformer
    small, large = transformer_flops_per_image(t, 16, 8), transformer_flops_per_image(t, 64, 8)
    assert 0 < small < large < 4 * small * 1.5  # matmuls grow linearly with tokens, attention faster



def test_t5_is_released_after_precompute_and_read_again_for_a_new_prompt(tiny_paths):
    """At real size T5-XXL is 9.5 GB of host memory beside the EMA, the parked snapshots and a checkpoint being
    written: once the data's prompts are encoded it is freed, and a later new prompt reads it from the folder."""
    from calligrapher_rl.models.stack import CalligrapherStack

    fresh = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8)
    stack = CalligrapherStack.from_pretrained(*tiny_paths, num_style_tokens=8, offload_text_encoder_two=True)
    assert stack.precompute_prompts(["a sign", "a shop"]) == 2
    assert stack.release_text_encoder_two()
    assert all(p.device.type == "meta" for p in stack.pipe.text_encoder_2.parameters())  # its memory is gone
    cached = stack.encode_prompts(["a sign"])  # from the cache: T5 stays released
    assert all(p.device.type == "meta" for p in stack.pipe.text_encoder_2.parameters())
    new = stack.encode_prompts(["a new prompt"])  # read again from the model folder
    assert next(stack.pipe.text_encoder_2.parameters()).device.type == "cpu"
    torch.testing.assert_close(new.prompt_embeds, fresh.encode_prompts(["a new prompt"]).prompt_embeds)
    torch.testing.assert_close(cached.prompt_embeds, fresh.encode_prompts(["a sign"]).prompt_embeds)
    assert not fresh.release_text_encoder_two()  # not offloaded: nothing to release


def test_old_policy_average_streamed_per_tensor_equals_the_host_average(tiny_stack):
    """The CUDA path of NFT's old-policy update (the fp32 master streamed through the card one tensor at a time)
    computes what the host path computes; run here on the CPU tensors, it must agree exactly."""
    import copy

    from calligrapher_rl.training.policies import Policies

    # a copy: the session's tiny stack is shared by later tests, and this one moves the weights
    pol = Policies(copy.deepcopy(tiny_stack.adapter), "attn", use_ema=False, ema_decay=0.9, ema_update_interval=1,
                   snapshot_dtype=torch.bfloat16)
    pol.begin_rl(with_old=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pol.params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    host = {n: v.clone() for n, v in pol.old_master.items()}, {n: v.clone() for n, v in pol.old.items()}
    pol.update_old(0.7)  # the host path (parameters on the CPU)
    want_master, want_old = dict(pol.old_master), dict(pol.old)
    pol.old_master, pol.old = host
    pol._update_old_on_device(0.7)
    for n in pol.names:
        assert torch.equal(pol.old_master[n], want_master[n]) and torch.equal(pol.old[n], want_old[n])
    pol._update_old_on_device(0.0)  # eta 0: the old policy becomes the current one, master unread
    for n, p in pol.named:
        assert torch.equal(pol.old_master[n], p.detach()) and torch.equal(pol.old[n], p.detach().bfloat16())


def test_a_checkpoints_big_files_are_written_side_by_side(tmp_path, monkeypatch):
    """The adapter and its EMA (12 GB each at real size) are written at once, not one after the other: each of the
    two writes waits for the other to have begun, which only returns when they run together. The files are then
    what was given, and the optimizer's state is beside them."""
    import threading

    from calligrapher_rl.models import checkpoints
    from calligrapher_rl.training.checkpointing import save_checkpoint

    both, write = threading.Barrier(2, timeout=60), checkpoints.save_file_streamed

    def meeting(tensors, path, **kwargs):
        both.wait()
        write(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file_streamed", meeting)
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    key = "attn_adapter.0.to_k_ip.weight"  # a key of the release's layout (a small adapter also gets the .bin)
    adapter, ema = {key: weight.detach().clone()}, {key: weight.detach() * 0.5}
    path = save_checkpoint(str(tmp_path), 1, adapter=adapter, ema=ema, old=None, optimizer=optimizer,
                           scheduler=scheduler, state={})
    assert torch.equal(load_file(f"{path}/ip-adapter.safetensors")[key], adapter[key])
    assert torch.equal(load_file(f"{path}/ip-adapter-ema.safetensors")[key], ema[key])
    moments = torch.load(f"{path}/trainer_state/optimizer.pt", weights_only=True)
    assert torch.equal(moments["state"][0]["exp_avg"], optimizer.state[weight]["exp_avg"])
