"""The one ViT behind every MLCD model size: a CLIP vision tower with either learned absolute position
embeddings (B/32, B/16, L/14, L/14-336) or the 2D rotary embedding of the released ViT-bigG/14 models.

Layout (weight names in parentheses; mlcd.models.hf maps them to transformers' names):
    patch conv, no bias (conv1) -> [class token (class_embedding); patches] (+ positional_embedding)
    -> ln_pre -> pre-LN blocks (ln_1, attn.in_proj [q|k|v] + attn.out_proj, ln_2, mlp.fc1/fc2)
    -> ln_post(class token) = pooled -> optional bias-free projection (proj) = embedding
RoPE2D (class_pos_emb): each head's first half-pairs rotate by the patch row, the second by the column
(split-half rotate_half, theta 10000, rotary dim head_dim/2); the class token's angles are learned.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ROPE_THETA = 10000.0


@dataclass
class ViTOutput:
    pooled: torch.Tensor                 # [B, width]      ln_post(class token) (HF pooler_output)
    embedding: torch.Tensor              # [B, embed_dim]  pooled @ proj (pooled when there is no projection)
    last_hidden_state: torch.Tensor      # [B, 1+N, width] not post-normed (HF last_hidden_state)
    hidden_states: tuple | None = None   # after ln_pre, then after each block (HF hidden_states)


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU; its checkpoints were trained with it."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def resize_pos_embed(pe: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1 + g*g, width] learned embedding (class token first) -> [1 + grid_h*grid_w, width]: the patch
    grid resized bicubically, as HF CLIP's interpolate_pos_encoding (224 -> 336 fine-tuning, odd inputs)."""
    g = int(round((pe.shape[0] - 1) ** 0.5))
    if (grid_h, grid_w) == (g, g):
        return pe
    grid = pe[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(pe.dtype)])


def rotate_half(x):
    """Split-half rotation (not interleaved): (a, b) -> (-b, a) over the two halves of the last dim."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope2d_angles(grid_h: int, grid_w: int, head_dim: int, class_pos_emb: torch.Tensor) -> torch.Tensor:
    """Rotation angles [1 + grid_h*grid_w, head_dim/2] in fp32: the learned class-token row, then one row per
    patch in row-major order holding [row * inv_freq | col * inv_freq]."""
    dim = head_dim // 2
    device = class_pos_emb.device
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    rows = torch.arange(grid_h, device=device, dtype=torch.float32).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device, dtype=torch.float32).repeat(grid_h)
    patches = torch.cat([torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)], dim=-1)
    return torch.cat([class_pos_emb.float(), patches], dim=0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, head_dim]; cos/sin [S, head_dim] fp32. Rotates in fp32 and casts back."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)   # rows: [q | k | v], each head-major
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, rope=None):
        B, S, D = x.shape
        q, k, v = self.in_proj(x).view(B, S, 3, self.heads, self.head_dim).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(x.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads, mlp_dim, act, ln_eps):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_dim: int,
                 embed_dim: int | None = None, pos_embed: str = "learned", act: str = "gelu",
                 ln_eps: float = 1e-5, name: str | None = None):
        super().__init__()
        if pos_embed not in ("learned", "rope2d"):
            raise ValueError(f"model.pos_embed must be 'learned' or 'rope2d', got {pos_embed!r}")
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"model.act must be 'gelu' or 'quick_gelu', got {act!r}")
        if width % heads:
            raise ValueError(f"model.width={width} is not divisible by model.heads={heads}")
        if pos_embed == "rope2d" and (width // heads) % 4:
            raise ValueError(f"rope2d needs head_dim = width/heads divisible by 4, got {width // heads}")
        if image_size % patch_size:
            raise ValueError(f"model.image_size={image_size} is not divisible by model.patch_size={patch_size}")
        self.cfg = dict(name=name, image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                        heads=heads, mlp_dim=mlp_dim, embed_dim=embed_dim, pos_embed=pos_embed, act=act,
                        ln_eps=ln_eps)   # what build_model / HF export need to rebuild this model
        self.name, self.image_size, self.patch_size = name, image_size, patch_size
        self.width, self.layers, self.heads, self.head_dim = width, layers, heads, width // heads
        self.pos_embed = pos_embed
        self.embed_dim = embed_dim or width
        self.grid = image_size // patch_size
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        if pos_embed == "learned":
            self.positional_embedding = nn.Parameter(torch.empty(1 + self.grid ** 2, width))
        else:
            self.class_pos_emb = nn.Parameter(torch.empty(1, self.head_dim // 2))
        self.ln_pre = nn.LayerNorm(width, eps=ln_eps)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_dim, act, ln_eps) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width, eps=ln_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False) if embed_dim else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """HF CLIP's init (also MLCD's): residual-branch inputs scaled by (2*layers)^-0.5."""
        w, L = self.width, self.layers
        nn.init.normal_(self.class_embedding, std=w ** -0.5)
        nn.init.normal_(self.conv1.weight, std=0.02)
        if self.pos_embed == "learned":
            nn.init.normal_(self.positional_embedding, std=0.02)
        else:
            nn.init.normal_(self.class_pos_emb, std=(self.head_dim // 2) ** -0.5)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.in_proj.weight, std=w ** -0.5 * (2 * L) ** -0.5)
            nn.init.normal_(blk.attn.out_proj.weight, std=w ** -0.5)
            nn.init.normal_(blk.mlp.fc1.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(blk.mlp.fc2.weight, std=w ** -0.5 * (2 * L) ** -0.5)
            for lin in (blk.attn.in_proj, blk.attn.out_proj, blk.mlp.fc1, blk.mlp.fc2):
                nn.init.zeros_(lin.bias)
        for ln in [self.ln_pre, self.ln_post] + [m for b in self.blocks for m in (b.ln_1, b.ln_2)]:
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=w ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Learned embedding [1 + grid_h*grid_w, width], resized when the input grid differs from the trained one."""
        return resize_pos_embed(self.positional_embedding, grid_h, grid_w)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> ViTOutput:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected pixel_values [B, 3, H, W], got shape {tuple(pixel_values.shape)}")
        H, W = pixel_values.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        gh, gw = H // p, W // p

        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        rope = None
        if self.pos_embed == "learned":
            x = x + self.position_embedding(gh, gw).to(x.dtype)
        else:
            angles = rope2d_angles(gh, gw, self.head_dim, self.class_pos_emb)
            angles = torch.cat([angles, angles], dim=-1)          # each angle drives dims (i, i + head_dim/2)
            rope = (angles.cos(), angles.sin())
        x = self.ln_pre(x)

        hidden = [x] if output_hidden_states else None
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
            if hidden is not None:
                hidden.append(x)

        pooled = self.ln_post(x[:, 0])
        embedding = self.proj(pooled) if self.proj is not None else pooled
        return ViTOutput(pooled, embedding, x, tuple(hidden) if hidden is not None else None)

