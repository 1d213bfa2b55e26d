"""A transcription of MPS's scoring (Kwai-Kolors/MPS at be9027f), for parity tests only.

Transcribed from ``trainer/models/cross_modeling.py`` (``Cross_model`` and its blocks), ``trainer/models/clip_model.py``
(``XCLIPModel.get_text_features`` / ``get_image_features``, ``CLIPModel``'s ``cross_model = Cross_model(dim=1024,
layer_num=4, heads=16)``; sizes are arguments here so a tiny model can be built) and
``eval_overall_mps_on_hpdv2.py`` (``infer_one_sample``). The repository pins transformers 4.27.3 and uses einops;
the only changes: einops' ``rearrange`` written as the equivalent reshape / permute, transformers 4.27's text pooling
(``last_hidden_state[arange, input_ids.argmax(-1)]``) written out, and float32 instead of ``.half()``. The image side
is the reference's own path: transformers' PIL ``CLIPImageProcessor`` on PIL images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import einsum, nn

CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")


def exists(val):
    return val is not None


def default(val, d):
    return val if exists(val) else d


class LayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args, **kwargs):
        return self.fn(x, *args, **kwargs) + x


class RotaryEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, max_seq_len, *, device):
        seq = torch.arange(max_seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = einsum("i , j -> i j", seq, self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)


def rotate_half(x):
    x = x.unflatten(-1, (2, x.shape[-1] // 2))  # rearrange(x, "... (j d) -> ... j d", j=2)
    x1, x2 = x.unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(pos, t):
    return (t * pos.cos()) + (rotate_half(t) * pos.sin())


class SwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class ParallelTransformerBlock(nn.Module):
    def __init__(self, dim, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.norm = LayerNorm(dim)
        attn_inner_dim = dim_head * heads
        ff_inner_dim = dim * ff_mult
        self.fused_dims = (attn_inner_dim, dim_head, dim_head, (ff_inner_dim * 2))
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner_dim, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_inner_dim, dim, bias=False))
        self.register_buffer("pos_emb", None, persistent=False)

    def get_rotary_embedding(self, n, device):
        if self.pos_emb is not None and self.pos_emb.shape[-2] >= n:
            return self.pos_emb[:n]
        pos_emb = self.rotary_emb(n, device=device)
        self.register_buffer("pos_emb", pos_emb, persistent=False)
        return pos_emb

    def forward(self, x, attn_mask=None):
        n, device, h = x.shape[1], x.device, self.heads
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.unflatten(-1, (h, -1)).permute(0, 2, 1, 3)  # rearrange(q, "b n (h d) -> b h n d", h=h)
        positions = self.get_rotary_embedding(n, device)
        q, k = map(lambda t: apply_rotary_pos_emb(positions, t), (q, k))
        q = q * self.scale
        sim = einsum("b h i d, b j d -> b h i j", q, k)
        if exists(attn_mask):
            attn_mask = attn_mask.unsqueeze(1)
            sim = sim.masked_fill(~attn_mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        out = einsum("b h i j, b j d -> b h i d", attn, v)
        out = out.permute(0, 2, 1, 3).flatten(2)  # rearrange(out, "b h n d -> b n (h d)")
        return self.attn_out(out) + self.ff_out(ff)


class CrossAttention(nn.Module):
    def __init__(self, dim, *, context_dim=None, dim_head=64, heads=12, parallel_ff=False, ff_mult=4,
                 norm_context=False):
        super().__init__()
        self.heads = heads
        self.scale = dim_head ** -0.5
        inner_dim = heads * dim_head
        context_dim = default(context_dim, dim)
        self.norm = LayerNorm(dim)
        self.context_norm = LayerNorm(context_dim) if norm_context else nn.Identity()
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        ff_inner_dim = ff_mult * dim
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_inner_dim * 2, bias=False),
            SwiGLU(),
            nn.Linear(ff_inner_dim, dim, bias=False)
        ) if parallel_ff else None

    def forward(self, x, context, mask):
        x = self.norm(x)
        context = self.context_norm(context)
        q = self.to_q(x)
        q = q.unflatten(-1, (self.heads, -1)).permute(0, 2, 1, 3)  # rearrange(q, 'b n (h d) -> b h n d')
        q = q * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        sim = einsum('b h i d, b j d -> b h i j', q, k)
        mask = mask.unsqueeze(1).repeat(1, self.heads, 1, 1)
        sim = sim + mask
        sim = sim - sim.amax(dim=-1, keepdim=True)
        attn = sim.softmax(dim=-1)
        out = einsum('b h i j, b j d -> b h i d', attn, v)
        out = out.permute(0, 2, 1, 3).flatten(2)  # rearrange(out, 'b h n d -> b n (h d)')
        out = self.to_out(out)
        if exists(self.ff):
            out = out + self.ff(x)
        return out


class Cross_model(nn.Module):
    def __init__(self, dim=512, layer_num=4, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.layers = nn.ModuleList([])
        for ind in range(layer_num):
            self.layers.append(nn.ModuleList([
                Residual(CrossAttention(dim=dim, dim_head=dim_head, heads=heads, parallel_ff=True, ff_mult=ff_mult)),
                Residual(ParallelTransformerBlock(dim=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult))
            ]))

    def forward(self, query_tokens, context_tokens, mask):
        for cross_attn, self_attn_ff in self.layers:
            query_tokens = cross_attn(query_tokens, context_tokens, mask)
            query_tokens = self_attn_ff(query_tokens)
        return query_tokens


class MPSModel(nn.Module):
    """clip_model.CLIPModel: ``model`` (a transformers CLIPModel) + ``cross_model``."""

    def __init__(self, clip, dim, layer_num, heads, dim_head):
        super().__init__()
        self.model = clip
        self.cross_model = Cross_model(dim=dim, layer_num=layer_num, heads=heads, dim_head=dim_head)

    @property
    def logit_scale(self):
        return self.model.logit_scale


def get_text_features(clip, input_ids):
    """XCLIPModel.get_text_features: (text_projection of every token's state, of the pooled EOS state)."""
    text_outputs = clip.text_model(input_ids=input_ids)
    last_hidden_state = text_outputs[0]
    text_features = clip.text_projection(last_hidden_state)
    pooled_output = last_hidden_state[torch.arange(last_hidden_state.shape[0]), input_ids.argmax(dim=-1)]  # 4.27
    text_features_EOS = clip.text_projection(pooled_output)
    return text_features, text_features_EOS


def get_image_features(clip, pixel_values):
    """XCLIPModel.get_image_features: visual_projection of every token of the encoder output."""
    vision_outputs = clip.vision_model(pixel_values=pixel_values)
    last_hidden_state = vision_outputs[0]
    return clip.visual_projection(last_hidden_state)


@torch.no_grad()
def infer_one_sample(image, prompt, clip_model, clip_processor, tokenizer, device="cpu", condition=None,
                     threshold=0.3):
    """``threshold``: the reference's literal 0.3, a parameter here so a test can make a tiny model's mask split."""
    def _process_image(image):
        image = image.convert("RGB")
        pixel_values = clip_processor(image, return_tensors="pt")["pixel_values"]
        return pixel_values

    def _tokenize(caption):
        input_ids = tokenizer(
            caption,
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt"
        ).input_ids
        return input_ids

    image_input = _process_image(image).to(device)
    text_input = _tokenize(prompt).to(device)
    if condition is None:
        condition = CONDITION
    condition_batch = _tokenize(condition).repeat(text_input.shape[0], 1).to(device)

    with torch.no_grad():
        text_f, text_features = get_text_features(clip_model.model, text_input)
        image_f = get_image_features(clip_model.model, image_input)
        condition_f, _ = get_text_features(clip_model.model, condition_batch)

        sim_text_condition = einsum('b i d, b j d -> b j i', text_f, condition_f)
        sim_text_condition = torch.max(sim_text_condition, dim=1, keepdim=True)[0]
        sim_text_condition = sim_text_condition / sim_text_condition.max()
        mask = torch.where(sim_text_condition > threshold, 0, float('-inf'))
        mask = mask.repeat(1, image_f.shape[1], 1)
        image_features = clip_model.cross_model(image_f, text_f, mask)[:, 0, :]

        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        image_score = clip_model.logit_scale.exp() * text_features @ image_features.T

    return image_score[0]
