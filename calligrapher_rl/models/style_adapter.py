"""The Calligrapher style adapter: SigLIP embedding -> style tokens -> style attention in every block.

Parameter names and shapes follow the public release (`calligrapher.bin`), so that
`StyleAdapter.state_dict()` *is* the release's layout flattened with dots:
`image_proj_mlp.*`, `image_proj_qformer.*`, `attn_adapter.{i}.to_k_ip.weight` / `.to_v_ip.weight`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .flux_api import apply_rotary_emb, dispatch_attention_fn, get_qkv_projections


@dataclass(frozen=True)
class StyleAdapterConfig:
    image_embed_dim: int = 1152  # SigLIP so400m pooler width (E)
    cross_attention_dim: int = 4096  # FLUX joint_attention_dim (D)
    inner_dim: int = 3072  # FLUX heads * head_dim (H)
    head_dim: int = 128
    num_style_tokens: int = 128  # N
    num_qformer_tokens: int = 32  # Q
    qformer_heads: int = 8
    num_processors: int = 57  # 19 double + 38 single blocks
    use_qformer: bool = True  # False: the older fork's MLP-only projection

    def to_dict(self) -> dict:
        return asdict(self)


class MLPProjModel(nn.Module):
    """`image_proj_mlp`: one embedding -> N style tokens."""

    def __init__(self, cfg: StyleAdapterConfig):
        super().__init__()
        e, d, n = cfg.image_embed_dim, cfg.cross_attention_dim, cfg.num_style_tokens
        self.num_tokens, self.dim = n, d
        self.proj = nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, d * n))
        self.norm = nn.LayerNorm(d)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(image_embeds).reshape(-1, self.num_tokens, self.dim)
        return self.norm(x)


class QFormerProjModel(nn.Module):
    """`image_proj_qformer`: learnable queries attend over Q tokens projected from the embedding."""

    def __init__(self, cfg: StyleAdapterConfig):
        super().__init__()
        e, d = cfg.image_embed_dim, cfg.cross_attention_dim
        self.num_kv, self.dim = cfg.num_qformer_tokens, d
        self.query_embeds = nn.Parameter(torch.randn(cfg.num_style_tokens, d) * 0.02)
        self.id_proj = nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, d * cfg.num_qformer_tokens))
        self.cross_attn = nn.MultiheadAttention(d, cfg.qformer_heads, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        b = image_embeds.shape[0]
        kv = self.id_proj(image_embeds).view(b, self.num_kv, self.dim)
        queries = self.query_embeds.unsqueeze(0).expand(b, -1, -1)
        attended = self.cross_attn(queries, kv, kv, need_weights=False)[0]
        return self.norm(self.cross_attn_norm(attended + queries))


class StyleAttnProcessor(nn.Module):
    """FLUX attention plus a separate attention of the image-token queries over the style tokens.

    With `style_tokens=None` (or scale 0) it computes exactly what diffusers' `FluxAttnProcessor` does,
    so installing it changes nothing until a style is given.
    """

    def __init__(self, cross_attention_dim: int, inner_dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.to_k_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        # Parameter-free RMSNorm on the style keys, as the release (its checkpoint holds no norm weights).
        self.norm_ip_k = nn.RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)

    def _style_kv(self, style_tokens: torch.Tensor, heads: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b = style_tokens.shape[0]
        # The adapter may keep fp32 master weights beside a bf16 transformer: project in the weights'
        # dtype (autocast, when on, still picks bf16), attend in the query's.
        tokens = style_tokens.to(self.to_k_ip.weight.dtype)
        key = self.to_k_ip(tokens).to(dtype).view(b, -1, heads, self.head_dim)
        value = self.to_v_ip(tokens).to(dtype).view(b, -1, heads, self.head_dim)
        return self.norm_ip_k(key), value

    def _style_attention(self, query: torch.Tensor, style_tokens: torch.Tensor, style_kv) -> torch.Tensor:
        # The style keys/values depend only on the tokens and the weights: a rollout (no gradient) computes
        # them once for all its steps (`StyleAdapter.style_kv`; measured: 15% of a rollout step on FLUX) and
        # passes them in as plain tensors, so a compiled transformer sees one graph per shape.
        if style_kv is not None and not torch.is_grad_enabled():
            key, value = style_kv
        else:
            key, value = self._style_kv(style_tokens, query.shape[2], query.dtype)
        # [B, L, heads, d] -> [B, heads, L, d] for SDPA; no RoPE on the style branch.
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        style_tokens: torch.Tensor | None = None,
        style_scale: float = 1.0,
        style_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        query, key, value, enc_query, enc_key, enc_value = get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        # The style query: image tokens (double blocks) or text+image tokens (single blocks),
        # normed, before RoPE and before the text tokens are joined.
        style_query = query
        use_style = style_tokens is not None and not (isinstance(style_scale, (int, float)) and style_scale == 0)

        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            enc_query = attn.norm_added_q(enc_query.unflatten(-1, (-1, attn.head_dim)))
            enc_key = attn.norm_added_k(enc_key.unflatten(-1, (-1, attn.head_dim)))
            enc_value = enc_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_query, query], dim=1)
            key = torch.cat([enc_key, key], dim=1)
            value = torch.cat([enc_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        hidden = hidden.flatten(2, 3).to(query.dtype)

        style_out = self._style_attention(style_query, style_tokens, style_kv) if use_style else None

        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            enc_hidden, hidden = hidden.split_with_sizes([n_txt, hidden.shape[1] - n_txt], dim=1)
            if style_out is not None:
                hidden = hidden + style_scale * style_out  # before to_out[0], as the release
            hidden = attn.to_out[1](attn.to_out[0](hidden.contiguous()))
            enc_hidden = attn.to_add_out(enc_hidden.contiguous())
            return hidden, enc_hidden
        if style_out is not None:
            hidden = hidden + style_scale * style_out
        return hidden


class StyleAdapter(nn.Module):
    """Everything that trains: the projections and the 57 processors' style key/value maps."""

    def __init__(self, cfg: StyleAdapterConfig):
        super().__init__()
        self.config = cfg
        self.image_proj_mlp = MLPProjModel(cfg)
        self.image_proj_qformer = QFormerProjModel(cfg) if cfg.use_qformer else None
        self.attn_adapter = nn.ModuleList(
            StyleAttnProcessor(cfg.cross_attention_dim, cfg.inner_dim, cfg.head_dim) for _ in range(cfg.num_processors)
        )

    def forward(self, image_embeds: torch.Tensor, kv_heads: int | None = None, kv_dtype=None):
        """Style tokens [B, N, D]; with `kv_heads`, also every processor's style (key, value) in `kv_dtype`.

        One module call, so `torch.func.functional_call` can evaluate both with another policy's weights."""
        tokens = self.style_tokens(image_embeds)
        if kv_heads is None:
            return tokens
        kv_dtype = kv_dtype or tokens.dtype
        # rounded to the transformer's dtype first, exactly as its forward rounds the tokens it is given:
        # the rollout's keys/values then equal the training forward's bit for bit (first ratio exactly 1)
        return tokens, self.style_kv(tokens.to(kv_dtype), kv_heads, kv_dtype)

    def style_kv(self, style_tokens: torch.Tensor, heads: int, dtype) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Each processor's style keys/values for fixed tokens (what a no-gradient rollout reuses every step)."""
        return tuple(proc._style_kv(style_tokens, heads, dtype) for proc in self.attn_adapter)

    def style_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, E] SigLIP pooled embedding -> [B, N, D] style tokens (mlp + qformer)."""
        image_embeds = image_embeds.to(self.image_proj_mlp.proj[0].weight.dtype)
        tokens = self.image_proj_mlp(image_embeds)
        if self.image_proj_qformer is not None:
            tokens = tokens + self.image_proj_qformer(image_embeds)
        return tokens

    def parameter_groups(self, trainable: str) -> list[tuple[str, nn.Parameter]]:
        """Named parameters of a trainable set: `all`, `attn` (to_k_ip/to_v_ip) or `proj` (projections)."""
        prefixes = {"all": ("",), "attn": ("attn_adapter.",), "proj": ("image_proj_mlp.", "image_proj_qformer.")}
        if trainable not in prefixes:
            raise ValueError(f"trainable set must be one of {sorted(prefixes)}, got {trainable!r}")
        return [(n, p) for n, p in self.named_parameters() if n.startswith(prefixes[trainable])]

    @classmethod
    def for_transformer(cls, transformer, image_embed_dim: int, **overrides) -> "StyleAdapter":
        tc = transformer.config
        cfg = StyleAdapterConfig(
            image_embed_dim=image_embed_dim,
            cross_attention_dim=tc.joint_attention_dim,
            inner_dim=tc.num_attention_heads * tc.attention_head_dim,
            head_dim=tc.attention_head_dim,
            num_processors=len(transformer.attn_processors),
            **overrides,
        )
        return cls(cfg)


class StyleProcessorHandle:
    """What the transformer holds: a plain callable pointing at the adapter's processor module.

    Were the module itself installed, nn.Module would register its weights a second time under the
    transformer; `torch.func.functional_call` (how old/reference policies are evaluated) mishandles such
    tied weights and leaves plain tensors behind. Through a handle the weights live in the adapter only.
    """

    def __init__(self, module: StyleAttnProcessor, index: int):
        self.module, self.index = module, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 style_tokens=None, style_scale=1.0, style_kv=None, block_style_kv=None):
        # `block_style_kv`: this block's (key, value) picked before the call (a regionally compiled block,
        # models/acceleration.py): the index is then never read inside the graph that all blocks share
        if block_style_kv is None and style_kv is not None:
            block_style_kv = style_kv[self.index]
        return self.module(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                           style_tokens=style_tokens, style_scale=style_scale, style_kv=block_style_kv)


def install_style_adapter(transformer, adapter: StyleAdapter) -> None:
    """Put the adapter's processors into the transformer, in its registration order (= release index order)."""
    names = list(transformer.attn_processors.keys())
    if len(names) != len(adapter.attn_adapter):
        raise ValueError(f"adapter has {len(adapter.attn_adapter)} processors, transformer has {len(names)}")
    transformer.set_attn_processor({name: StyleProcessorHandle(adapter.attn_adapter[i], i) for i, name in enumerate(names)})
