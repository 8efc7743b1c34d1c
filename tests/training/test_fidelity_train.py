"""Issue 10: the released optimiser groups and the parameter-free Table 4 "neither" variant."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from synthetic_data import train_overrides

from pipeline.errors import UserError
from pipeline.model import build_model, count_parameters, make_model_config
from pipeline.training.config import OptimConfig, build_config
from pipeline.training.loop import train
from pipeline.training.schedule import lr_at, param_groups, set_group_rates

pytestmark = pytest.mark.usefixtures("one_thread")


def _groups(schedule: str):
    model = build_model(make_model_config(vision_dim=16, text_dim=16, preset="tiny"))
    optim = OptimConfig(decoder_schedule=schedule)
    optimizer = torch.optim.AdamW(param_groups(model, optim=optim), lr=optim.lr)
    return model, optim, optimizer


def test_decoder_keeps_a_constant_lr_while_the_fusion_module_warms_up():
    model, optim, optimizer = _groups("constant")
    for step in (0, 5, 10_000):
        lr = lr_at(step=step, steps_per_epoch=10, optim=optim)
        set_group_rates(optimizer, lr=lr, wd=0.3)
        fusion, norms, decoder = optimizer.param_groups
        assert fusion["lr"] == norms["lr"] == lr and fusion["weight_decay"] == 0.3
        assert decoder["lr"] == 1e-3 and decoder["weight_decay"] == 0.0  # a separate Adam at constant 1e-3
    assert lr_at(step=0, steps_per_epoch=10, optim=optim) == pytest.approx(1e-5)  # warm-up: 1e-3 / 100
    decoder_params = {id(p) for p in model.decoder.parameters()}
    assert {id(p) for p in optimizer.param_groups[2]["params"]} == decoder_params


def test_the_shared_schedule_is_a_named_option():
    _, optim, optimizer = _groups("shared")
    set_group_rates(optimizer, lr=1e-5, wd=0.3)
    assert optimizer.param_groups[2]["lr"] == 1e-5


def test_neither_variant_has_no_trainable_parameter_and_is_the_frozen_cosine():
    config = make_model_config(vision_dim=16, text_dim=16, preset="tiny",
                               overrides={"fusion": {"mode": "frozen"}, "decoder": {"enabled": False}})
    model = build_model(config)
    assert count_parameters(model) == {"fusion": 0, "decoder": 0, "total": 0}
    visual, text = torch.randn(2, 4, 16), torch.randn(3, 16)
    logits = model(visual, text, grid=(2, 2), out_size=8)
    pixels = F.interpolate(F.normalize(visual, dim=-1).transpose(1, 2).reshape(2, 16, 2, 2), size=(8, 8),
                           mode="bilinear", align_corners=False)
    expected = torch.einsum("bdhw,cd->bchw", F.normalize(pixels, dim=1), F.normalize(text, dim=-1)) / 0.07
    assert torch.allclose(logits, expected, atol=1e-5)


def test_neither_variant_needs_equal_widths_and_no_decoder():
    with pytest.raises(UserError, match="vision_dim \\(24\\) must equal text_dim \\(16\\)"):
        make_model_config(vision_dim=24, text_dim=16, overrides={"fusion": {"mode": "frozen"},
                                                                "decoder": {"enabled": False}})
    with pytest.raises(UserError, match="decoder.enabled false"):
        make_model_config(vision_dim=16, text_dim=16, overrides={"fusion": {"mode": "frozen"}})


def test_training_the_neither_variant_takes_no_step_and_saves_a_usable_model(gen, tmp_path):
    run = tmp_path / "neither"
    overrides = train_overrides(gen, run, "model.fusion.mode=frozen", "model.decoder.enabled=false",
                                f"data.text_cache={gen.vision}", "optim.epochs=2")
    summary = train(config=build_config(preset="tiny", overrides=overrides), quiet=True)
    assert summary["steps"] == 0 and summary["parameters"]["total"] == 0
    from pipeline.training.checkpoints import load_model

    model, config = load_model(run)
    assert config.model.fusion.mode == "frozen"
    assert json.loads((run / "summary.json").read_text())["steps"] == 0


def _pascal_trn_lists(root, pairs_by_fold):
    trn = root / "pascal" / "trn"
    trn.mkdir(parents=True)
    for fold, pairs in pairs_by_fold.items():
        (trn / f"fold{fold}.txt").write_text("".join(f"{image}__{value:02d}\n" for image, value in pairs))
    return root


def test_training_samples_follow_the_standard_lists_when_given(gen, tmp_path):
    from pipeline.store.reader import open_split
    from pipeline.training.batches import training_pairs
    from pipeline.data.protocols import resolve_fold
    from pipeline.training.lists import listed_samples

    split = open_split(store=gen.vision, split="folder/train")
    fold = resolve_fold(protocol="pascal5i", fold=0, novel=None, class_names=split.class_names)
    every = training_pairs(split=split, seen=fold.seen, classes_per_sample="1")
    present = sorted({(split.image_ids[int(split.view_image[v])], c[0]) for v, c in every})
    listed = present[::2]  # half of the pairs the cache shows
    lists = _pascal_trn_lists(tmp_path / "splits", {1: [p for p in listed if p[1] <= 10],
                                                    2: [p for p in listed if 10 < p[1] <= 15],
                                                    3: [p for p in listed if p[1] > 15]})
    kept = listed_samples(split=split, protocol="pascal5i", fold=0, splits_dir=lists, classes_per_sample="1")
    pairs = {(split.image_ids[image], c[0]) for image, c in kept}
    assert pairs == set(listed) and len(kept) == len(listed) < len(present)
    assert all((split.image_ids[image], c[0]) in set(listed) for image, c in kept)


def test_a_listed_image_missing_from_the_cache_is_refused(gen, tmp_path):
    from pipeline.store.reader import open_split
    from pipeline.training.lists import listed_samples

    split = open_split(store=gen.vision, split="folder/train")
    lists = _pascal_trn_lists(tmp_path / "splits", {1: [("2008_000001", 6)], 2: [], 3: []})
    with pytest.raises(UserError, match="not in .*first: 2008_000001"):
        listed_samples(split=split, protocol="pascal5i", fold=0, splits_dir=lists, classes_per_sample="1")


def test_mosaic4_training_composites_see_every_class_of_their_split():
    from pipeline.data.protocols import resolve_fold

    fold = resolve_fold(protocol="mosaic4", fold=0, novel=None,
                        class_names=["a", "b", "c", "d", "e"])
    assert fold.seen == (1, 2, 3, 4, 5) and fold.novel == ()


def _val_lists(root, lines):
    folder = root / "pascal" / "val"
    folder.mkdir(parents=True)
    (folder / "fold1.txt").write_text("".join(f"{line}\n" for line in lines))
    return root


def test_best_val_selection_refuses_a_validation_split_that_shares_test_images(gen, tmp_path):
    from pipeline.runs import train_and_validate

    lists = _val_lists(tmp_path / "splits", ["g000__06", "g005__08"])
    config = build_config(preset="tiny", overrides=train_overrides(
        gen, tmp_path / "run", "data.fold=1", "select=best-val", "val_split=folder/val", f"test_lists={lists}"))
    with pytest.raises(UserError, match="2 image\\(s\\) of val_split folder/val are test episode images"):
        train_and_validate(config=config, quiet=True)
    with pytest.raises(UserError, match="needs test_lists"):
        train_and_validate(config=build_config(preset="tiny", overrides=train_overrides(
            gen, tmp_path / "run2", "select=best-val", "val_split=folder/val")), quiet=True)


def test_best_val_selection_reports_the_best_validation_weights_labelled(gen, tmp_path):
    from safetensors.torch import load_file

    from pipeline.runs import train_and_validate

    lists = _val_lists(tmp_path / "splits", ["2008_000001__06"])  # no image of the cache: disjoint
    run = tmp_path / "run"
    config = build_config(preset="tiny", overrides=train_overrides(
        gen, run, "data.fold=1", "select=best-val", "val_split=folder/val", f"test_lists={lists}", "optim.epochs=2"))
    summary = train_and_validate(config=config, quiet=True)
    best = max(summary["val"], key=lambda r: r["miou"])
    assert summary["selection"]["rule"] == "best-val" and summary["selection"]["epoch"] == best["epoch"]
    assert json.loads((run / "summary.json").read_text())["selection"] == summary["selection"]
    chosen, saved = load_file(str(run / "model.safetensors")), load_file(str(run / "model_best.safetensors"))
    assert all(torch.equal(chosen[k], saved[k]) for k in chosen) and (run / "model_final.safetensors").is_file()


def test_the_vision_encoders_registry_entry_decides_the_decoder_depth(gen, tmp_path, monkeypatch):
    import dataclasses

    from pipeline.encode import registry
    from pipeline.store.layout import open_store, store_attrs

    assert registry.registry_decoder_blocks("clip-rn101") == 5 and registry.registry_decoder_blocks("clip-l") == 4
    encoder = store_attrs(open_store(gen.vision))["encoder"]
    monkeypatch.setitem(registry._REGISTRY, encoder, dataclasses.replace(registry.get_spec(encoder), decoder_blocks=5))
    run = tmp_path / "k5"
    overrides = train_overrides(gen, run, "model.decoder.channels=[]", "optim.max_steps=1")
    train(config=build_config(preset="tiny", overrides=overrides), quiet=True)
    saved = json.loads((run / "config.json").read_text())["model"]
    assert saved["decoder"]["channels"] == [saved["fusion"]["width"]] * 5
    # A config that names its blocks wins over the registry.
    run = tmp_path / "k3"
    overrides = train_overrides(gen, run, "model.decoder.channels=[]", "model.decoder.blocks=3", "optim.max_steps=1")
    train(config=build_config(preset="tiny", overrides=overrides), quiet=True)
    assert len(json.loads((run / "config.json").read_text())["model"]["decoder"]["channels"]) == 3


def test_a_run_saved_before_the_released_decoder_order_and_loss_loads_as_it_was_trained(gen, tmp_path):
    from pipeline.training.checkpoints import load_model

    run = tmp_path / "old"
    train(config=build_config(preset="tiny", overrides=train_overrides(gen, run, "optim.max_steps=1")), quiet=True)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["decoder"]["upsample"] == "features" and saved["optim"]["loss_reduction"] == "sample"
    del saved["model"]["decoder"]["upsample"], saved["model"]["decoder"]["blocks"], saved["optim"]["loss_reduction"]
    (run / "config.json").write_text(json.dumps(saved))
    model, config = load_model(run)
    assert config.model.decoder.upsample == "logits" and config.optim.loss_reduction == "pixel"
    with pytest.raises(UserError, match="different config"):  # today's defaults would train another model
        train(config=build_config(preset="tiny", overrides=train_overrides(gen, run, "optim.max_steps=2")),
              resume=True, quiet=True)


def test_a_default_runs_summary_says_its_weights_are_the_final_ones(gen, tmp_path):
    from pipeline.runs import train_and_validate

    run = tmp_path / "final"
    train_and_validate(config=build_config(preset="tiny", overrides=train_overrides(gen, run, "optim.max_steps=1")),
                       quiet=True)
    assert json.loads((run / "summary.json").read_text())["selection"] == {"rule": "final"}


def test_the_released_init_is_an_option_with_a_decayed_unit_class_embedding():
    torch.manual_seed(0)
    product = build_model(make_model_config(vision_dim=16, text_dim=16, overrides={"fusion": {"layers": 1}}))
    released = build_model(make_model_config(vision_dim=16, text_dim=16,
                                             overrides={"fusion": {"layers": 1, "init": "released"}}))
    assert 0.5 < float(released.fusion.class_type.detach().std()) < 1.5
    assert float(product.fusion.class_type.detach().std()) < 0.05
    assert float(released.fusion.text_out.weight.detach().std()) == pytest.approx(512 ** -0.5, rel=0.05)
    decayed = {id(p) for g in param_groups(released) if g.get("wd_schedule") for p in g["params"]}
    assert id(released.fusion.class_type) in decayed
    decayed = {id(p) for g in param_groups(product) if g.get("wd_schedule") for p in g["params"]}
    assert id(product.fusion.class_type) not in decayed
    assert count_parameters(released) == count_parameters(product)
