"""The step window of the GPU check: samples counted exactly, operators ranked with shares, card peaks, barrier."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from synthetic_data import write_folder_dataset
from synthetic_data import tiny_extract_config as tiny_config
from torch.autograd import DeviceType

from pipeline.bench.packed import Barrier
from pipeline.bench.steps import StepWindow, card_peak, top_operators
from pipeline.encode.extract import extract
from pipeline.training.config import build_config
from pipeline.training.flops import training_flops_per_sample
from pipeline.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread", "reuse_encoders")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
])
def test_card_peaks_by_name(name, peak):
    assert card_peak(name)[0] == peak


def test_an_unknown_card_or_a_cpu_has_no_peak_and_says_why():
    peak, note = card_peak("Tesla T4")
    assert peak is None and "Tesla T4" in note and "not in the table" in note
    assert card_peak(None) == (None, "no GPU: a CPU has no peak in the table")


def _event(name, *, device_type=DeviceType.CPU, device_us=0.0, cpu_us=0.0, count=1, annotation=False):
    return SimpleNamespace(key=name, device_type=device_type, self_device_time_total=device_us,
                           self_cpu_time_total=cpu_us, count=count, is_user_annotation=annotation)


def test_operators_rank_by_the_kernel_time_they_launched_with_shares_of_all_kernel_time():
    events = [
        _event("aten::mm", device_us=6000.0, cpu_us=50.0, count=40),
        _event("aten::add_", device_us=1000.0, cpu_us=400.0, count=90),
        _event("aten::view", cpu_us=900.0, count=300),  # no kernel: never ranked by device time
        _event("ProfilerStep#3", device_us=9000.0, annotation=True),  # a label, not an operator
        _event("sm90_gemm_kernel", device_type=DeviceType.CUDA, device_us=6000.0),
        _event("elementwise_kernel", device_type=DeviceType.CUDA, device_us=1000.0),
        _event("orphan_kernel", device_type=DeviceType.CUDA, device_us=1000.0),  # launched outside any operator
    ]
    table = top_operators(events, device=True, count=5, seconds=0.016, steps=2)
    assert [row["name"] for row in table["top"]] == ["aten::mm", "aten::add_"]
    assert table["top"][0]["share"] == pytest.approx(0.75) and table["top"][1]["share"] == pytest.approx(0.125)
    assert table["total_ms"] == pytest.approx(8.0) and table["device_busy_fraction"] == pytest.approx(0.5)
    cpu = top_operators(events, device=False, count=2, seconds=0.016, steps=2)
    assert [row["name"] for row in cpu["top"]] == ["aten::view", "aten::add_"]
    assert cpu["top"][0]["share"] == pytest.approx(900 / 1350) and cpu["device_busy_fraction"] is None


def test_step_window_counts_the_samples_of_its_steps_and_profiles_the_ones_before(tmp_path):
    data = write_folder_dataset(tmp_path / "data")
    extract(config=tiny_config(data, tmp_path / "store"), quiet=True)
    window = StepWindow(warm=2, profile=2, timed=5)
    batch = 5  # 12 samples: batches of 5, 5 and 2
    config = build_config(preset="tiny", overrides=[
        f"data.cache={tmp_path / 'store'}", "data.protocol=custom", "data.novel=[dog]", "optim.epochs=50",
        "optim.warmup_epochs=1", f"optim.batch_size={batch}", f"optim.max_steps={window.total_steps}",
        f"out={tmp_path / 'run'}", "device=cpu"])
    train(config=config, quiet=True, hooks=[window])
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    samples, per_epoch = start["samples"], start["steps_per_epoch"]
    assert samples % batch, "the test needs an epoch whose last batch is short"
    sizes = [min(batch, samples - ((step - 1) % per_epoch) * batch) for step in range(5, 10)]  # steps 5..9
    record = window.record()
    assert record["samples"] == sum(sizes) < 5 * batch  # a short batch fell in the window
    assert record["samples_per_s"] == pytest.approx(sum(sizes) / record["seconds"])
    fitted = build_config(base=json.loads((tmp_path / "run" / "config.json").read_text()))
    flops = training_flops_per_sample(fitted.model, grid=(2, 2), classes=1)  # test-vit at 32 px: 2 x 2 patches
    assert record["gflop_per_sample"] == pytest.approx(flops / 1e9)
    assert math.isclose(record["achieved_tflops"], record["samples_per_s"] * flops / 1e12)
    operators = window.operators()
    assert operators["steps"] == 2 and operators["time"] == "cpu" and operators["top"]
    assert sum(row["share"] for row in operators["top"]) <= 1 + 1e-9


def test_a_run_too_short_for_its_window_says_so(tmp_path):
    window = StepWindow(warm=1, timed=3)
    with pytest.raises(RuntimeError, match="4 steps needed"):
        window.record()


def test_the_barrier_waits_for_every_run_and_gives_up_after_its_timeout(tmp_path):
    (tmp_path / "ready-1").touch()
    ready = Barrier(folder=tmp_path, index=0, count=2, timeout=5)
    ready.before_train(None)
    assert not ready.timed_out and (tmp_path / "ready-0").is_file()
    alone = Barrier(folder=tmp_path, index=2, count=4, timeout=0.1)
    alone.before_train(None)
    assert alone.timed_out
