"""The policies of one run, all of them style-adapter weights over one shared frozen transformer.

    current    the live adapter parameters (trained)
    reference  a snapshot taken when RL begins; the KL term pulls towards it
    old        NFT's slowly-following copy (theta_old <- eta theta_old + (1 - eta) theta)
    ema        the evaluation/release average of the trainable parameters

Snapshots are plain dicts name -> tensor (trainable weights only) evaluated through
`stack.velocity(..., params=...)`, so none of them needs a second transformer or a second adapter.
"""

from __future__ import annotations

import logging

import torch

from ..models.style_adapter import StyleAdapter
from ..rl.ema import ParamEMA
from ..rl.nft import update_old_params


class Policies:
    def __init__(self, adapter: StyleAdapter, trainable: str, *, use_ema: bool, ema_decay: float,
                 ema_update_interval: int, snapshot_dtype=torch.float32, ema_device=None, named=None):
        self.adapter = adapter
        # `named`: another trainable set, e.g. LoRA weights (lora_policies.py)
        self.named = adapter.parameter_groups(trainable) if named is None else named
        self.names = [n for n, _ in self.named]
        trainable_ids = {id(p) for _, p in self.named}
        for p in adapter.parameters():
            p.requires_grad_(id(p) in trainable_ids)
        self.snapshot_dtype = snapshot_dtype
        self.ema = ParamEMA(self.params, ema_decay, ema_update_interval, device=ema_device) if use_ema else None
        self.reference: dict[str, torch.Tensor] | None = None
        self.old: dict[str, torch.Tensor] | None = None
        # With low-precision snapshots, NFT's old policy is averaged in an fp32 master in host memory:
        # increments of (1 - eta) (theta - theta_old) with eta near 1 would round away in bf16.
        self.old_master: dict[str, torch.Tensor] | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The trainable weights, detached. Frozen adapter weights are the same in every policy, so
        `functional_call` takes them from the live adapter: a snapshot costs only what trains."""
        return {n: p.detach().clone().to(self.snapshot_dtype) for n, p in self.named}

    # ------------------------------------------------------------ reference and old policies
    @property
    def exact_snapshots(self) -> bool:
        return self.snapshot_dtype == torch.float32

    def begin_rl(self, with_old: bool) -> None:
        self.reference = self.snapshot()
        self.old = self.snapshot() if with_old else None
        self.old_master = None
        if with_old and not self.exact_snapshots:
            self.old_master = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self.named}

    def update_old(self, eta: float) -> None:
        if self.old is None:
            return
        if self.old_master is None:
            update_old_params([self.old[n] for n in self.names], [p.detach() for p in self.params], eta)
            return
        update_old_params([self.old_master[n] for n in self.names],
                          [p.detach().to("cpu", torch.float32) for p in self.params], eta)
        for n in self.names:
            self.old[n].copy_(self.old_master[n])

    def reference_state(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint keeps of the reference (LoRA policies keep nothing when it is the base model)."""
        return self.reference

    def old_state(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint keeps of the old policy: the fp32 master when there is one."""
        return self.old_master if self.old_master is not None else self.old

    # ------------------------------------------------------------ EMA
    def ema_step(self, global_step: int) -> None:
        if self.ema is not None:
            self.ema.step(self.params, global_step)

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """The full adapter with the EMA weights in place of the trainable ones."""
        if self.ema is None:
            return None
        full = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
        for name, shadow in zip(self.names, self.ema.shadow):
            full[name] = shadow.detach().clone()
        return full

    def load_ema_state(self, full: dict[str, torch.Tensor], num_updates: int) -> None:
        if self.ema is None:
            return
        for name, shadow in zip(self.names, self.ema.shadow):
            shadow.copy_(full[name].to(shadow.device, torch.float32))
        self.ema.num_updates = num_updates

    def evaluation_weights(self):
        """Context in which the live adapter holds the EMA weights (a no-op without EMA)."""
        import contextlib

        return self.ema.swapped_in(self.params) if self.ema is not None else contextlib.nullcontext()

    def load_snapshots(self, reference: dict | None, old: dict | None, device) -> None:
        cast = (lambda d: {k: v.to(device, self.snapshot_dtype) for k, v in d.items()} if d else None)
        self.reference, self.old = cast(reference), cast(old)
        self.old_master = None
        if old and not self.exact_snapshots:
            self.old_master = {k: v.to("cpu", torch.float32, copy=True) for k, v in old.items()}


class WeightHealth:
    """Warnings (the studio shows the log) when nothing trains or the weights blow up: a gradient norm
    of exactly 0 for `zero_steps` optimizer steps in a row, or a trainable-weight norm `growth` times its
    value at the first step."""

    def __init__(self, zero_steps: int = 3, growth: float = 100.0):
        self.zero_steps, self.growth = zero_steps, growth
        self.norm0: float | None = None
        self.zero_streak, self.grew_warned = 0, False

    @torch.no_grad()
    def check(self, params, applied: bool, grad_norm: float) -> float:
        """Call after each optimizer step (`applied` False when it was skipped); returns the weight norm."""
        log = logging.getLogger("calligrapher_rl.training")
        norm = float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params)))
        if self.norm0 is None:
            self.norm0 = norm
        self.zero_streak = self.zero_streak + 1 if applied and grad_norm == 0 else 0
        if self.zero_streak == self.zero_steps:
            log.warning("gradient norm exactly 0 for %d optimizer steps in a row: nothing trains (is "
                        "--ip_adapter_scale 0, or is every reward of each group equal?)", self.zero_steps)
        if not self.grew_warned and self.norm0 > 0 and norm > self.growth * self.norm0:
            self.grew_warned = True
            log.warning("trainable weight norm grew from %.3g to %.3g (over %gx): the update is diverging; "
                        "lower --learning_rate", self.norm0, norm, self.growth)
        return norm
