"""The encoder registry: output shapes, seeded random init, weight errors, prompt averaging.

The full-size towers built here are the `fullsize` tier (``make test-fast`` leaves them out);
the tiny test-only entries are checked beside them in the fast tier.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.encode.families import _clip_text_forward, create_encoder
from pipeline.encode.prompts import TEMPLATES
from pipeline.encode.registry import get_spec, list_encoders
from pipeline.errors import UserError
from memory import release_memory

# The smallest input each vision tower accepts: one patch grid of 2 x 2 keeps ViT-L cheap.
SMALL_INPUT = {"clip-b": 32, "clip-l": 28, "clip-rn101": 64, "dino-b": 32, "moco-b": 32}
FEW_TEMPLATES = TEMPLATES[:3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny inputs gain nothing from threads, and OpenMP spinning crawls on a busy 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.lru_cache(maxsize=2)
def _random_encoder(name: str):
    """The last two random-init encoders built are kept (building dominates these tests); no more,
    or the eight full-size towers of the registry (5.4 GB of float32) would all be alive at once."""
    return create_encoder(name, random_init=True, input_size=SMALL_INPUT.get(name))


@pytest.fixture(scope="module", autouse=True)
def _release_encoders():
    """Full-size towers leave with this module instead of living for the whole session."""
    yield
    _random_encoder.cache_clear()
    release_memory()


@pytest.fixture(autouse=True)
def _trim_after_each_test():
    """What a test's towers leave behind goes back before the next one builds."""
    yield
    release_memory()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a, b, dim=0))


def test_registry_lists_the_eight_encoders():
    assert list_encoders() == ["bert-b", "bert-l", "clip-b", "clip-l", "clip-rn101", "dino-b", "minilm", "moco-b"]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# Random-init weights are seeded by name: test_output_shapes_with_random_init checks it on these, beside
# the build it has already made.
SEEDED = {"clip-b": "vision", "bert-b": "text", "dino-b": "vision"}


def _assert_same_weights(first, second, *, tower: str) -> None:
    if tower == "vision":
        a, b = _state(first.vision.tower), _state(second.vision.tower)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        sentences = ["a photo of a cat.", "There is a dog in the scene"]
        assert torch.equal(first.text.encode_names(sentences, templates=FEW_TEMPLATES),
                           second.text.encode_names(sentences, templates=FEW_TEMPLATES))


@pytest.mark.fullsize
@pytest.mark.parametrize("name", list_encoders())
def test_output_shapes_with_random_init(name):
    spec = get_spec(name)
    encoders = create_encoder(name, random_init=True, input_size=SMALL_INPUT.get(name))  # one name alive at a time
    assert encoders.weights.pretrained is False and encoders.weights.source == "random-init"
    if "vision" in spec.towers:
        size = SMALL_INPUT[name]
        side = size // spec.patch_size
        images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        tokens = encoders.vision.encode(images)
        assert tokens.shape == (2, side * side, spec.vision_dim)  # [B, h*w, D]
        assert encoders.vision.grid == (side, side)
        assert torch.isfinite(tokens).all()
    else:
        assert encoders.vision is None
    if "text" in spec.towers:
        emb = encoders.text.encode_names(["cat", "traffic light", "dog"], templates=FEW_TEMPLATES)
        assert emb.shape == (3, spec.text_dim)  # [C, D]
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert not torch.allclose(emb[0], emb[1])
    else:
        assert encoders.text is None
    if name in SEEDED:  # a second build of the same name gives the same weights (checked here: builds dominate)
        _assert_same_weights(encoders, create_encoder(name, random_init=True, input_size=SMALL_INPUT.get(name)),
                             tower=SEEDED[name])


def test_minilm_real_weights_know_a_kitten_from_a_car():
    encoders = create_encoder("minilm")
    assert encoders.weights.pretrained is True
    cat, kitten, car = encoders.text.encode_names(["cat", "kitten", "car"])
    assert _cosine(cat, kitten) > _cosine(cat, car) + 0.05


@pytest.mark.fullsize
def test_same_architecture_under_another_name_gets_other_weights():
    dino, moco = _random_encoder("dino-b"), _random_encoder("moco-b")
    weight = "blocks.0.attn.qkv.weight"
    assert not torch.equal(dino.vision.tower.state_dict()[weight], moco.vision.tower.state_dict()[weight])


TEST_ENCODERS = [name for name in list_encoders(tests=True) if get_spec(name).test_only]


def test_test_only_encoders_are_tiny_real_towers_of_the_same_families():
    assert TEST_ENCODERS == ["test-text", "test-timm", "test-vit"]
    assert {get_spec(name).family for name in TEST_ENCODERS} == {"open_clip", "timm", "hf_text"}
    assert not set(TEST_ENCODERS) & set(list_encoders())  # the paper's registry lists only real encoders
    for name in TEST_ENCODERS:
        encoders = create_encoder(name, random_init=True, input_size=32)
        towers = [t for t in (encoders.vision, encoders.text) if t is not None]
        assert len(towers) == len(get_spec(name).towers)
        if encoders.vision is not None:
            assert sum(p.numel() for p in encoders.vision.tower.parameters()) < 400_000


@pytest.mark.parametrize("name", TEST_ENCODERS)
def test_test_only_encoders_give_the_registry_shapes_and_are_seeded(name):
    spec = get_spec(name)
    first, second = (create_encoder(name, random_init=True, input_size=32) for _ in range(2))
    if "vision" in spec.towers:
        images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        tokens = first.vision.encode(images)
        assert tokens.shape == (2, 4, spec.vision_dim) and torch.equal(tokens, second.vision.encode(images))
    if "text" in spec.towers:
        emb = first.text.encode_names(["cat", "dog"], templates=FEW_TEMPLATES)
        assert emb.shape == (2, spec.text_dim) and not torch.allclose(emb[0], emb[1])
        assert torch.equal(emb, second.text.encode_names(["cat", "dog"], templates=FEW_TEMPLATES))


def test_test_only_encoders_have_no_weights_to_load(tmp_path):
    with pytest.raises(UserError, match="test-vit is a test-only encoder without weights: pass `random_init`"):
        create_encoder("test-vit")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(UserError, match="test-only"):
        create_encoder("test-timm", weights=tmp_path / "w.pt")


def test_unknown_encoder_is_a_user_error():
    with pytest.raises(UserError, match="unknown encoder 'clip-xl'.*clip-b"):
        create_encoder("clip-xl", random_init=True)


def test_missing_weights_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="weights file not found") as info:
        create_encoder("dino-b", weights=missing)
    assert str(missing) in str(info.value)


def test_weights_and_random_init_exclude_each_other(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="`weights` and `random_init`"):
        create_encoder("dino-b", weights=path, random_init=True)


def test_moco_needs_a_checkpoint():
    with pytest.raises(UserError, match="`weights`"):
        create_encoder("moco-b")


def test_input_size_must_fit_the_patch_grid():
    with pytest.raises(UserError, match="multiple of clip-b's patch size 16"):
        create_encoder("clip-b", random_init=True, input_size=40)


def test_encode_names_averages_normalised_template_embeddings():
    """normalise(mean over templates of normalise(sentence embedding)), grouped per name."""
    text = create_encoder("minilm").text
    names, templates = ["cat", "potted plant"], TEMPLATES[:5]
    sentences = [t.format(n) for n in names for t in templates]
    raw = text._encode_sentences(sentences).float()  # [C * T, D]
    expected = []
    for i in range(len(names)):
        rows = raw[i * len(templates):(i + 1) * len(templates)]
        unit = rows / rows.norm(dim=-1, keepdim=True)
        mean = unit.mean(dim=0)
        expected.append(mean / mean.norm())
    got = text.encode_names(names, templates=templates, batch_size=4)  # batches cut across names
    assert torch.allclose(got, torch.stack(expected), atol=1e-6)
    # The average differs from any single template's embedding: averaging really happened.
    assert not torch.allclose(got[0], raw[0] / raw[0].norm(), atol=1e-3)


@pytest.mark.fullsize
def test_fast_clip_text_path_matches_open_clip():
    from pipeline.encode.compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    tokens = tokenizer(["x", "a photo of a cat.", "This is a cropped photo of a large potted plant in the scene"])
    with torch.inference_mode():
        fast = _clip_text_forward(model, tokens)
        full = model.encode_text(tokens)
    assert fast.shape == full.shape == (3, 512)
    assert torch.allclose(fast, full, atol=1e-5, rtol=0)


def test_text_encoding_shows_progress_unless_quiet(capsys):
    """80 names x 32 prompts ran ~40 s without a word; the prompts now count up on stderr."""
    import torch

    from pipeline.encode.registry import get_spec
    from pipeline.encode.towers import TextEncoder

    encoder = TextEncoder(spec=get_spec("minilm"), encode_sentences=lambda batch: torch.ones(len(batch), 4),
                          weights=None, device=torch.device("cpu"), dim=4)
    assert encoder.encode_names(["cat", "dog", "bus"], batch_size=40).shape == (3, 4)
    assert "prompt" not in capsys.readouterr().err  # quiet by default inside the library
    encoder.encode_names(["cat", "dog", "bus"], batch_size=40, quiet=False)
    err = capsys.readouterr().err
    assert "minilm text" in err and "96/96" in err  # 3 names x 32 templates


def test_the_hub_probe_respects_a_mirror_and_an_https_proxy():
    from pipeline.encode.families import hub_probe_target

    assert hub_probe_target({}) == ("huggingface.co", 443)
    assert hub_probe_target({"HF_ENDPOINT": "https://hf-mirror.example.org"}) == ("hf-mirror.example.org", 443)
    assert hub_probe_target({"HF_ENDPOINT": "http://10.0.0.9:8080"}) == ("10.0.0.9", 8080)
    assert hub_probe_target({"HTTPS_PROXY": "http://proxy:3128", "HF_ENDPOINT": "https://m.org"}) == ("proxy", 3128)
    assert hub_probe_target({"https_proxy": "proxy.local:8080"}) == ("proxy.local", 8080)


@pytest.mark.parametrize("size", [40, -16])
def test_an_input_size_that_is_no_positive_multiple_of_the_patch_is_one_line(size):
    with pytest.raises(UserError, match=f"`input_size` {size} is not a positive multiple of test-vit's patch size 16"):
        create_encoder("test-vit", random_init=True, input_size=size)
