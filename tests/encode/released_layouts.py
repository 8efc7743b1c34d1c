"""Weight files with the layouts of the released ones (key names, nesting, prefixes, dtypes, containers),
built in temporary folders with seeded random values. Nothing here is committed as a file.

- OpenAI CLIP: a TorchScript archive traced from a module tree with the names OpenAI's ``clip/model.py``
  builds (``visual.conv1``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``ln_post``, ``proj``,
  ``token_embedding``, ``text_projection`` ...), fp16 weights, and the ``input_resolution``,
  ``context_length`` and ``vocab_size`` entries its ``state_dict()`` carries.
- DINO / MoCo v3: timm-named ViT weights under ``teacher`` + ``backbone.`` (DINO, with its
  ``argparse.Namespace`` of options) or ``state_dict`` + ``module.base_encoder.`` (MoCo v3).
- Hugging Face: ``save_pretrained`` folders of a tiny BERT, with or without tokenizer files.
"""

from __future__ import annotations

import argparse
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = mask

    def forward(self, x):  # [L, B, W]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mask: torch.Tensor | None = None):
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(width, heads, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class Visual(nn.Module):
    def __init__(self, *, resolution: int, patch: int, width: int, layers: int, heads: int, embed: int):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Tower(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, h*w, W]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenAICLIP(nn.Module):
    """OpenAI's CLIP ViT, as its released archives name things."""

    def __init__(self, *, resolution=224, patch=16, width=768, layers=12, embed=512, text_width=512,
                 text_layers=12, context=77, vocab=49408):
        super().__init__()
        self.visual = Visual(resolution=resolution, patch=patch, width=width, layers=layers, heads=width // 64,
                             embed=embed)
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.transformer = Tower(text_width, text_layers, text_width // 64, mask)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(text_width ** -0.5 * torch.randn(text_width, embed))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        # The sizes OpenAI's TorchScript archives carry among their state_dict entries.
        self.register_buffer("input_resolution", torch.tensor(resolution))
        self.register_buffer("context_length", torch.tensor(context))
        self.register_buffer("vocab_size", torch.tensor(vocab))

    def forward(self, image, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.transpose(0, 1)).transpose(0, 1))
        text_emb = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return self.logit_scale.exp() * self.visual(image) @ text_emb.t()


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random values of a plausible scale in every float tensor (LayerNorms near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=gen) * 0.02
                tensor.copy_(values + 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "norm1.weight",
                                                            "norm2.weight", "ln_pre.weight", "ln_post.weight",
                                                            "ln_final.weight", "norm.weight")) else values)
    return module


def openai_torchscript(path: Path, *, seed: int = 0, **sizes) -> Path:
    """A TorchScript archive like OpenAI's ``ViT-B-16.pt``: traced, fp16 weights."""
    model = randomise(OpenAICLIP(**sizes), seed).eval()
    resolution = int(model.input_resolution)
    example = (torch.zeros(1, 3, resolution, resolution), torch.zeros(1, int(model.context_length), dtype=torch.long))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.half()
    traced.save(str(path))
    return path


def timm_vit_state(name: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm ViT's weights (DINO's and MoCo v3's own ViT code uses the same names)."""
    from pipeline.encode.compat import ensure_torchvision

    ensure_torchvision()
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0)
    return {k: v.clone() for k, v in randomise(model, seed).state_dict().items()}


def dino_full_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """``dino_vitbase16_pretrain_full_checkpoint.pth``: student, teacher, optimiser, argparse options."""
    head = {"head.mlp.0.weight": torch.randn(16, state["norm.weight"].shape[0]), "head.last_layer.weight_g": torch.ones(8, 1)}
    teacher = {**{f"backbone.{k}": v for k, v in state.items()}, **head}
    student = {f"module.{k}": v + 0.5 for k, v in teacher.items()}
    args = argparse.Namespace(arch="vit_base", patch_size=16, out_dim=65536, lr=0.0005, epochs=400,
                              output_dir="/checkpoint/dino", teacher_temp=0.04, local_crops_scale=(0.05, 0.4))
    torch.save({"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 400, "args": args, "dino_loss": {"center": torch.zeros(1, 16)}}, path)
    return path


def moco_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """``vit-b-300ep.pth.tar``: base and momentum encoders under DDP's ``module.``, a predictor."""
    base = {f"module.base_encoder.{k}": v for k, v in state.items()}
    momentum = {f"module.momentum_encoder.{k}": v.clone() for k, v in state.items()}
    extra = {"module.predictor.0.weight": torch.randn(32, 16), "module.base_encoder.head.0.weight": torch.randn(8, 4)}
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": {**base, **momentum, **extra},
                "optimizer": {"state": {}, "param_groups": []}, "scaler": {"scale": 65536.0}}, path)
    return path


def tiny_bert_folder(path: Path, *, tokenizer: bool, width: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A ``save_pretrained`` folder of a tiny BERT; with the BERT uncased vocabulary when ``tokenizer``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.encode.hftext import minilm_dir

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=4 * width)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    if tokenizer:
        AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(path)
    return path
