"""The Calligrapher stack: FLUX.1-Fill components + SigLIP + the style adapter, loaded from local folders.

The stack is the one place that knows how FLUX-Fill is fed: text embeddings (cached per prompt, so T5
can leave the GPU), the packed fill condition (masked-image latents + the 8x8 mask), the VAE shift and
scale, and the transformer call with the style tokens. Sampling and training only call its methods.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from ..errors import UserError
from ..images import pad_to_square
from .acceleration import sampling_attention
from .checkpoints import config_from_state_dict, load_into_adapter, read_adapter_file
from .style_adapter import StyleAdapter, install_style_adapter


@dataclass
class FillCondition:
    """Everything about the images that stays fixed while one group is denoised."""

    cond: torch.Tensor  # [B, L, 64 + 256]: packed masked-image latents and packed mask
    img_ids: torch.Tensor  # [L, 3]
    height: int
    width: int

    @property
    def seq_len(self) -> int:
        return self.cond.shape[1]


@dataclass
class TextCondition:
    prompt_embeds: torch.Tensor  # [B, T, D]
    pooled: torch.Tensor  # [B, P]
    text_ids: torch.Tensor  # [T, 3]


class CalligrapherModel(nn.Module):
    """transformer + adapter as one module, so `torch.func.functional_call` can evaluate the same network
    with another set of adapter weights (old policy, reference policy) without copying anything."""

    def __init__(self, transformer: nn.Module, adapter: StyleAdapter):
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter

    def forward(self, latents, fill: FillCondition, text: TextCondition, sigma, image_embeds, guidance, scale=1.0,
                style_tokens=None, style_kv=None):
        b = latents.shape[0]
        dtype = self.transformer.dtype
        if style_tokens is None:
            style_tokens = self.adapter(image_embeds)
        style_tokens = style_tokens.to(dtype)
        guidance_t = torch.full((b,), float(guidance), device=latents.device, dtype=torch.float32)
        # contiguous: a stride-0 expanded timestep and a real [B] one would be two compiled graphs
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(b).contiguous()
        return self.transformer(
            hidden_states=torch.cat([latents.to(dtype), fill.cond.to(dtype)], dim=2),
            timestep=sigma.to(dtype),
            guidance=guidance_t if self.transformer.config.guidance_embeds else None,
            pooled_projections=text.pooled.to(dtype),
            encoder_hidden_states=text.prompt_embeds.to(dtype),
            txt_ids=text.text_ids,
            img_ids=fill.img_ids,
            joint_attention_kwargs={"style_tokens": style_tokens, "style_scale": scale, "style_kv": style_kv},
            return_dict=False,
        )[0]


def resolve_model_paths(flux_path: str, siglip_path: str) -> tuple[str, str]:
    """Local folders of what the user typed: a folder, `tiny` (the embedded random model, built on first use),
    `tiny-pretrained` (the shipped one that writes) or a Hugging Face Hub id (from the local cache; see hub.py)."""
    from .hub import resolve_model

    return resolve_model(flux_path, "flux").path, resolve_model(siglip_path, "siglip").path


class CalligrapherStack:
    def __init__(self, pipe, siglip, siglip_processor, adapter: StyleAdapter, device, dtype, max_sequence_length):
        self.pipe, self.siglip, self.siglip_processor = pipe, siglip, siglip_processor
        self.adapter, self.device, self.dtype = adapter, torch.device(device), dtype
        self.max_sequence_length = max_sequence_length
        self.model = CalligrapherModel(pipe.transformer, adapter)
        # What the gradient path calls: `model`, or its DistributedDataParallel wrapper on several processes
        # (set by the trainer), so that gradient all-reduces overlap the backward.
        self.train_model: nn.Module = self.model
        # An optional float8 copy of the transformer for no-gradient sampling (see acceleration.py).
        self.quantized_model: CalligrapherModel | None = None
        self.quantized_attention = "default"  # its SDPA backends (acceleration.sampling_attention)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # images through the transformer so far, without and with gradient (the trainer's TFLOP/s figures)
        self.forward_counts = {"no_grad": 0, "grad": 0}

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, flux_path: str, siglip_path: str, *, adapter_path: str | None = None,
                        device="cpu", dtype=torch.float32, num_style_tokens: int = 128, use_qformer: bool = True,
                        max_sequence_length: int | None = None, offload_text_encoder_two: bool = False,
                        seed: int = 0):
        from diffusers import FluxFillPipeline
        from transformers import SiglipVisionModel

        if adapter_path is None and flux_path == "tiny-pretrained":  # the name stands for its whole stack
            adapter_path = "tiny-pretrained"
        lora_path, adapter_path, seed, num_style_tokens, use_qformer = lora_checkpoint_parts(
            adapter_path, seed, num_style_tokens, use_qformer)  # a LoRA checkpoint: its base adapter first
        flux_path, siglip_path = resolve_model_paths(flux_path, siglip_path)
        try:
            pipe = FluxFillPipeline.from_pretrained(flux_path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"cannot load FLUX-Fill ({str(exc).splitlines()[0][:160]})", where=flux_path,
                            field="--pretrained_model_name_or_path") from None
        try:
            siglip = SiglipVisionModel.from_pretrained(siglip_path, dtype=dtype, local_files_only=True)
            processor = _load_siglip_processor(siglip_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"cannot load SigLIP ({str(exc).splitlines()[0][:160]})", where=siglip_path,
                            field="--siglip_path") from None

        overrides = dict(num_style_tokens=num_style_tokens, use_qformer=use_qformer)
        # with a file, this adapter only gives the config its weights are read against: built on the meta device,
        # it skips a random init of 3.0 B parameters on the CPU at real size (~30 s on 2 cores)
        with torch.random.fork_rng(devices=[]), torch.device("meta" if adapter_path else "cpu"):
            torch.manual_seed(seed)  # a fresh adapter's init depends on `seed` only
            adapter = StyleAdapter.for_transformer(pipe.transformer, siglip.config.hidden_size, **overrides)
        if adapter_path:
            from .tiny import resolve_adapter_name

            adapter_path = resolve_adapter_name(adapter_path)
            _, flat = read_adapter_file(adapter_path)
            adapter = StyleAdapter(config_from_state_dict(flat, adapter.config))
            load_into_adapter(adapter, flat, adapter_path)
        install_style_adapter(pipe.transformer, adapter)

        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, siglip):
            module.requires_grad_(False).eval()
        adapter.to(device=device, dtype=torch.float32).requires_grad_(True)  # fp32 master weights
        for name, component in pipe.components.items():  # an offloaded T5-XXL (9.5 GB) never visits the card
            if isinstance(component, torch.nn.Module) and not (offload_text_encoder_two and name == "text_encoder_2"):
                component.to(device)
        adapter.to(device)  # set_attn_processor + pipe.to may not move the projections
        siglip.to(device)
        if lora_path is not None:  # merged into the base weights: inference runs the plain architecture
            from .lora import apply_lora_checkpoint

            apply_lora_checkpoint(pipe.transformer, adapter, lora_path)
        if offload_text_encoder_two:
            pipe.text_encoder_2.to("cpu")
        seq = max_sequence_length or (512 if pipe.text_encoder_2.config.d_model >= 1024 else 32)
        stack = cls(pipe, siglip, processor, adapter, device, dtype, seq)
        stack.offload_text_encoder_two = offload_text_encoder_two
        stack.flux_path = flux_path  # where T5-XXL is read again after release_text_encoder_two
        return stack

    def release_text_encoder_two(self) -> bool:
        """Frees the offloaded T5-XXL (9.5 GB of host memory at real size) once every prompt the run knows is
        encoded: at real size the host also holds the EMA, the parked snapshots and the checkpoint being written.
        A prompt met later (studio sample prompts) reads T5 from the model folder again, once. True if freed."""
        t5 = self.pipe.text_encoder_2
        if not getattr(self, "offload_text_encoder_two", False) or next(t5.parameters()).device.type != "cpu" \
                or not getattr(self, "flux_path", None):
            return False
        t5.to("meta")
        self._t5_released = True
        return True

    def _text_encoder_two(self):
        """T5-XXL, read again from the model folder if it was released."""
        if getattr(self, "_t5_released", False):
            from transformers import T5EncoderModel

            t5 = T5EncoderModel.from_pretrained(self.flux_path, subfolder="text_encoder_2", dtype=self.dtype,
                                                local_files_only=True)
            self.pipe.text_encoder_2 = t5.requires_grad_(False).eval().to("cpu")
            self._t5_released = False
        return self.pipe.text_encoder_2

    # ---------------------------------------------------------------- conditions
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        """CLIP pooled + T5 sequence embeddings, cached per prompt string."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            t5 = self._text_encoder_two()
            t5_device = next(t5.parameters()).device
            embeds = self.pipe._get_t5_prompt_embeds(todo, 1, self.max_sequence_length, t5_device)
            pooled = self.pipe._get_clip_prompt_embeds(todo, 1, self.device)
            for i, p in enumerate(todo):  # in host memory: 4 MB a prompt at real size, a dataset's worth adds up
                self._text_cache[p] = (embeds[i].to("cpu", self.dtype), pooled[i].to("cpu", self.dtype))
        prompt_embeds = torch.stack([self._text_cache[p][0] for p in prompts]).to(self.device)
        pooled = torch.stack([self._text_cache[p][1] for p in prompts]).to(self.device)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        return TextCondition(prompt_embeds, pooled, text_ids)

    @torch.no_grad()
    def precompute_prompts(self, prompts: list[str], batch_size: int = 8) -> int:
        """Encode every prompt once, before training: with T5-XXL offloaded to host memory (9.5 GB) it is
        brought to the card for these batches only. Otherwise each new prompt would run T5-XXL on the CPU
        inside the rollout (seconds per prompt at real size). Returns how many were encoded."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if not todo:
            return 0
        t5 = self._text_encoder_two()
        home = next(t5.parameters()).device
        if home != self.device:
            t5.to(self.device)
        try:
            for i in range(0, len(todo), batch_size):
                self.encode_prompts(todo[i:i + batch_size])
        finally:
            if home != self.device:
                t5.to(home)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return len(todo)

    @torch.no_grad()
    def encode_style(self, references: list[Image.Image]) -> torch.Tensor:
        """SigLIP pooled embeddings [B, E] of references padded to a black square."""
        squares = [pad_to_square(r.convert("RGB")) for r in references]
        pixels = self.siglip_processor(images=squares, return_tensors="pt")["pixel_values"]
        out = self.siglip(pixel_values=pixels.to(self.device, self.dtype))
        return out.pooler_output.float()

    @torch.no_grad()
    def prepare_fill(self, sources: torch.Tensor, masks: torch.Tensor, generator=None) -> FillCondition:
        """sources [B,3,H,W] in [-1,1]; masks [B,1,H,W] in {0,1} (1 = repaint). As FluxFillPipeline does."""
        b, _, h, w = sources.shape
        masks = (masks > 0.5).to(self.device, self.dtype)
        masked = sources.to(self.device, self.dtype) * (1 - masks)
        mask_packed, masked_latents = self.pipe.prepare_mask_latents(
            masks, masked, b, self.pipe.vae.config.latent_channels, 1, h, w, self.dtype, self.device, generator
        )
        lh, lw = self.latent_hw(h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, lh // 2, lw // 2, self.device, self.dtype)
        return FillCondition(torch.cat([masked_latents, mask_packed], dim=-1), img_ids, h, w)

    def latent_hw(self, h: int, w: int) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        return 2 * (h // (f * 2)), 2 * (w // (f * 2))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Clean packed latents x0 of images [B,3,H,W] in [-1,1]: `(z - shift) * scale`, packed 2x2."""
        from diffusers.pipelines.flux.pipeline_flux_fill import retrieve_latents

        z = retrieve_latents(self.pipe.vae.encode(images.to(self.device, self.dtype)), generator=generator)
        return self.pack_latents(z)

    def pack_latents(self, z: torch.Tensor) -> torch.Tensor:
        """A VAE sample [B,16,h,w] -> the transformer's packed latents: `(z - shift) * scale`, packed 2x2."""
        cfg = self.pipe.vae.config
        z = (z - cfg.shift_factor) * cfg.scaling_factor
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> images [B,3,H,W] in [-1,1] (`z / scale + shift`)."""
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents.to(self.dtype), height, width, self.pipe.vae_scale_factor)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def noise_like(self, fill: FillCondition, n: int, generator=None) -> torch.Tensor:
        shape = (n, fill.seq_len, self.pipe.transformer.config.out_channels)
        return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(self.device)

    # ---------------------------------------------------------------- the network
    def velocity(self, latents, fill, text, sigma, image_embeds, guidance, scale=1.0, params=None, style_tokens=None,
                 style_kv=None, quantized: bool = False):
        """Predicted velocity (eps - x0) in float32; `params` evaluates other adapter weights (old/ref).

        `style_tokens` and `style_kv` (from `style_condition()` with the same params; `style_kv` is used only
        without gradient) skip the projection and each block's style key/value maps: a rollout computes
        them once instead of at every step. `quantized` runs the float8 copy when there is one (no-gradient sampling
        only: its log-probabilities would not match the training forward)."""
        args = (latents, fill, text, sigma, image_embeds, guidance, scale, style_tokens, style_kv)
        self.forward_counts["grad" if torch.is_grad_enabled() else "no_grad"] += latents.shape[0]
        model = self.quantized_model if quantized and self.quantized_model is not None else self.model
        with (sampling_attention(self.quantized_attention) if model is not self.model and not torch.is_grad_enabled()
              else contextlib.nullcontext()):
            return self._call(model, args, params)

    def _call(self, model, args, params) -> torch.Tensor:
        if params is not None:
            # adapter names, plus `transformer.`-prefixed ones of a transformer LoRA (models/lora.py)
            named = {k if k.startswith("transformer.") else f"adapter.{k}": v for k, v in params.items()}
            if torch.is_grad_enabled():
                out = torch.func.functional_call(model, named, args, strict=False)
            else:
                with weights_in_place(model, named):
                    out = model(*args)
        elif torch.is_grad_enabled() and model is self.model:
            out = self.train_model(*args)
        else:
            out = model(*args)
        return out.float()

    def enable_fp8_rollouts(self, scales: str = "row", attention: str = "default", fused_qkv: bool = False) -> None:
        """No-gradient sampling through a float8 copy (acceleration.fp8_copy) with `scales` per row or per
        tensor, its attention on `attention`'s SDPA backends (acceleration.sampling_attention), its q/k/v
        projections fused (`fused_qkv`, acceleration.fuse_qkv)."""
        from .acceleration import fp8_copy

        sampling_attention(attention)  # an unknown name fails here, not at the first rollout
        self.quantized_model = CalligrapherModel(fp8_copy(self.pipe.transformer, scales, fused_qkv), self.adapter)
        self.quantized_attention = attention

    def enable_compile(self, cache_dir: str | None = None, with_grad: bool = True, scope: str = "whole",
                       backend: str = "inductor") -> None:
        """`with_grad=False` compiles only the no-gradient forward (rollouts, reference means, evaluation);
        the gradient forward/backward stays eager. `scope`: `whole` or `blocks` (regional; see
        acceleration.compile_transformer). The float8 copy samples only: its no-gradient calls compile, in
        the same scope (by blocks, its cold compile is a fraction of the whole graph's)."""
        from .acceleration import compile_transformer

        compile_transformer(self.pipe.transformer, cache_dir, backend, with_grad=with_grad, scope=scope)
        if self.quantized_model is not None:
            compile_transformer(self.quantized_model.transformer, cache_dir, backend, with_grad=False, scope=scope)

    def style_tokens(self, image_embeds: torch.Tensor, params=None) -> torch.Tensor:
        if params is None:
            return self.adapter(image_embeds)
        return torch.func.functional_call(self.adapter, _adapter_only(params), (image_embeds,), strict=False)

    def style_condition(self, image_embeds: torch.Tensor, params=None):
        """(style tokens, every block's style keys/values) for a no-gradient rollout, in the transformer's
        dtype: computed once, passed to every step as plain tensors."""
        args = (image_embeds, self.pipe.transformer.config.num_attention_heads, self.dtype)
        if params is None:
            return self.adapter(*args)
        return torch.func.functional_call(self.adapter, _adapter_only(params), args, strict=False)


@contextlib.contextmanager
def weights_in_place(model: nn.Module, named: dict[str, torch.Tensor]):
    """For one no-gradient call: each named parameter of `model` holds the mapping's tensor (its `.data`, restored
    after, whatever happens). The same result as `functional_call`, but the module keeps its Parameter objects: a
    compiled transformer then runs another policy's transformer LoRA in the live weights' graph, where
    functional_call's plain tensors would make dynamo trace the whole model again (minutes at FLUX size).
    Names that are not parameters of `model` are ignored, as with `functional_call(strict=False)`."""
    own = dict(model.named_parameters())
    saved = []
    try:
        for name, value in named.items():
            p = own.get(name)
            if p is not None:
                saved.append((p, p.data))
                p.data = value
        yield
    finally:
        for p, data in reversed(saved):
            p.data = data


def _adapter_only(params: dict) -> dict:
    """A policy mapping without the transformer's LoRA weights (the adapter alone does not hold them)."""
    return {k: v for k, v in params.items() if not k.startswith("transformer.")}


def lora_checkpoint_parts(adapter_path: str | None, seed: int, tokens: int, use_qformer: bool):
    """(LoRA checkpoint or None, the adapter file to load first, and the seed, token count and projection of
    a fresh base adapter: a LoRA checkpoint's lora.json names them)."""
    import os

    from .lora import find_lora

    found = find_lora(adapter_path) if adapter_path and os.path.exists(adapter_path) else None
    if found is None:
        return None, adapter_path, seed, tokens, use_qformer
    info = found[2]
    return (adapter_path, info.get("base_adapter"), int(info.get("seed", seed)),
            info.get("num_style_tokens") or tokens, info.get("use_qformer", use_qformer))


def _load_siglip_processor(path: str):
    try:  # the PIL processor: no torchvision needed, and no warning about it
        from transformers import SiglipImageProcessorPil

        return SiglipImageProcessorPil.from_pretrained(path, local_files_only=True)
    except ImportError:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
