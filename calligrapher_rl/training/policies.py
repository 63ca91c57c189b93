"""The policies of one run, all of them style-adapter weights over one shared frozen transformer.

    current    the live adapter parameters (trained)
    reference  a snapshot taken when RL begins; the KL term pulls towards it
    old        NFT's slowly-following copy (theta_old <- eta theta_old + (1 - eta) theta)
    ema        the evaluation/release average of the trainable parameters

Snapshots are plain dicts name -> tensor (trainable weights only) evaluated through
`stack.velocity(..., params=...)`, so none of them needs a second transformer or a second adapter.
"""

from __future__ import annotations

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
        # host buffers the snapshots wait in while parked (place), page-locked once per run
        self._pinned: dict[tuple[str, str], torch.Tensor] = {}

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
            self.old_master = {n: _host_fp32(p.detach()) for n, p in self.named}

    def place(self, device, *, reference: bool = False, old: bool = False) -> None:
        """Keep on `device` only the snapshots the next phase evaluates; the others wait in pinned host memory
        (CUDA only: on the CPU there is nothing to save). At real size each snapshot of the full adapter is
        6 GB in bf16: GRPO needs its reference only while rolling out (the reference means are computed
        there), NFT its old and reference policies only before the gradient passes (sampling.rollout,
        updates.nft_targets), so the update runs with neither on the card."""
        device = torch.device(device)
        if device.type != "cuda":
            return
        self.reference = self._move(self.reference, "ref", device if reference else None)
        self.old = self._move(self.old, "old", device if old else None)

    def _move(self, snap: dict | None, kind: str, device) -> dict | None:
        if snap is None:
            return None
        if device is not None:
            return {k: v.to(device, non_blocking=True) for k, v in snap.items()}
        out = {}
        for k, v in snap.items():
            if v.device.type == "cpu":
                out[k] = v
                continue
            buf = self._pinned.get((kind, k))
            if buf is None:  # pinned once per run: page-locking 6 GB costs seconds, a copy into it does not
                buf = self._pinned[(kind, k)] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            out[k] = buf.copy_(v, non_blocking=True)
        torch.cuda.synchronize()  # the host copies are complete before anyone reads them
        return out

    def update_old(self, eta: float) -> None:
        if self.old is None:
            return
        if self.old_master is None:
            update_old_params([self.old[n] for n in self.names],
                              [p.detach().to(self.old[n].device) for n, p in self.named], eta)
            return
        if self.params[0].device.type == "cuda":
            self._update_old_on_device(eta)
            return
        update_old_params([self.old_master[n] for n in self.names],
                          [p.detach().to("cpu", torch.float32) for p in self.params], eta)
        for n in self.names:
            self.old[n].copy_(self.old_master[n])

    def _update_old_on_device(self, eta: float) -> None:
        """The fp32 average computed on the card one tensor at a time, the pinned master streamed up and back:
        at real size ~30 GB of page-locked transfers (about a second) instead of a pageable 12 GB copy of the
        weights and a 3 B-element average on the host CPU (about ten seconds an epoch), and no transient host
        copy. Same formula as update_old_params; with eta = 0 (old <- current) the master is not read."""
        for n, p in self.named:
            master, cur = self.old_master[n], p.detach().float()
            mixed = cur if eta == 0.0 else eta * master.to(cur.device, non_blocking=True) + (1.0 - eta) * cur
            master.copy_(mixed, non_blocking=True)
            self.old[n].copy_(mixed.to(self.old[n].dtype), non_blocking=True)
        if self.params and self.params[0].device.type == "cuda":
            torch.cuda.synchronize()  # the host copies are complete before anyone reads them

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
        # no clone: the frozen weights and the shadows are only read (by a save, which copies them to the
        # host); a clone would allocate the whole adapter again on the card (12 GB at real size)
        full = {k: v.detach() for k, v in self.adapter.state_dict().items()}
        for name, shadow in zip(self.names, self.ema.shadow):
            full[name] = shadow.detach()
        return full

    def load_ema_state(self, full: dict[str, torch.Tensor], num_updates: int) -> None:
        if self.ema is None:
            return
        for name, shadow in zip(self.names, self.ema.shadow):
            shadow.copy_(full[name].to(shadow.device, torch.float32))
        self.ema.num_updates = num_updates

    def evaluation_params(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights as a `params=` mapping for the forwards, used in place without any copy, when they
        live on the weights' device; None without EMA or with the EMA in host memory (`evaluation_weights`)."""
        if self.ema is None or not self.names or self.ema.shadow[0].device != self.params[0].device:
            return None
        return dict(zip(self.names, self.ema.shadow))

    def evaluation_weights(self):
        """Context in which the live adapter holds the EMA weights when the EMA is in host memory (the live
        weights wait there meanwhile: no second copy of the adapter on the GPU); a no-op otherwise."""
        import contextlib

        if self.ema is None or self.evaluation_params() is not None:
            return contextlib.nullcontext()
        return self.ema.swapped_in(self.params)

    def load_snapshots(self, reference: dict | None, old: dict | None, device) -> None:
        cast = (lambda d: {k: v.to(device, self.snapshot_dtype) for k, v in d.items()} if d else None)
        self.reference, self.old = cast(reference), cast(old)
        self.old_master = None
        if old and not self.exact_snapshots:
            self.old_master = {k: _host_fp32(v) for k, v in old.items()}



def _host_fp32(t: torch.Tensor) -> torch.Tensor:
    """An fp32 host copy of `t`, page-locked when CUDA is there (the old policy's master streams through it
    every epoch)."""
    if not torch.cuda.is_available():
        return t.to("cpu", torch.float32, copy=True)
    return torch.empty(t.shape, dtype=torch.float32, pin_memory=True).copy_(t)
