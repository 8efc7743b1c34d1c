"""``fusioner serve`` over HTTP: the page's answers are ``fusioner predict``'s bytes, the run loads once,
requests queue, and every bad request is one line on the page, never a traceback."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from serving import get, post_photo, running  # noqa: E402

import pipeline.encode.families  # noqa: E402
import pipeline.eval.predict  # noqa: E402
import pipeline.training.checkpoints  # noqa: E402
from cli import main  # noqa: E402
from pipeline.eval.predict import Predictor  # noqa: E402
from pipeline.serve.app import ServeLimits, build_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _png(height: int = 80, width: int = 96, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _assert_one_line_error(status: int, answer: dict, expected_status: int, words: str) -> None:
    assert status == expected_status, answer
    assert set(answer) == {"error"} and words in answer["error"], answer
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]


@pytest.mark.parametrize("mode", ["windows", "resize"])
def test_the_page_answers_with_the_bytes_predict_writes(mode, learned, served, coco128, tmp_path):
    photo = sorted((coco128 / "images").glob("*.jpg"))[0]
    names = "person, dog, zebra"  # zebra is no name of the run's text store: encoded on demand by both
    out = tmp_path / "cli"
    assert main(["predict", str(photo), "--classes", names, "--checkpoint", str(learned), "--out", str(out), "-q",
                 *(["--resize"] if mode == "resize" else [])]) == 0
    status, answer = post_photo(served, data=photo.read_bytes(), filename=photo.name, names=names, mode=mode)
    assert status == 200, answer
    assert base64.b64decode(answer["overlay"]) == (out / "overlay.png").read_bytes()
    assert base64.b64decode(answer["labels"]) == (out / "labels.png").read_bytes()
    assert [m["name"] for m in answer["masks"]] == ["person", "dog", "zebra"]
    for mask in answer["masks"]:
        assert base64.b64decode(mask["png"]) == (out / mask["file"]).read_bytes()
    written = json.loads((out / "prediction.json").read_text())
    assert json.loads(answer["prediction"]) == {**written, "image": photo.name}  # the page names the upload
    assert answer["views"] == written["views"] and (written["views"] == 1) == (mode == "resize")
    assert answer["pretrained"] is False and "random-init" in answer["notes"][0]


def test_the_overlay_is_titled_with_the_photo_name(served, learned, monkeypatch, tmp_path):
    titles = []
    draw = pipeline.eval.predict.overlay
    monkeypatch.setattr(pipeline.eval.predict, "overlay", lambda **kw: titles.append(kw["title"]) or draw(**kw))
    assert post_photo(served, data=_png(), filename="holiday.png", names="cat, dog", mode="resize")[0] == 200
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "beach.png").write_bytes(_png())
    assert main(["predict", str(tmp_path / "photos" / "beach.png"), "--classes", "cat, dog", "--checkpoint",
                 str(learned), "--out", str(tmp_path / "out"), "--resize", "-q"]) == 0
    assert titles == ["holiday.png", "beach.png"]  # the file's name, never a class name or a folder


def test_the_run_loads_once_and_requests_queue(learned, monkeypatch):
    calls = Counter()
    for module, name in ((pipeline.training.checkpoints, "load_model"), (pipeline.encode.families, "create_encoder")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _name=name, **k: calls.update([_name]) or _real(*a, **k))
    predictor = Predictor(checkpoint=learned, device="cpu")
    inside, most, guard = [0], [0], threading.Lock()
    predict = predictor.predict

    def counted(**kwargs):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return predict(**kwargs)
        finally:
            with guard:
                inside[0] -= 1

    predictor.predict = counted
    new_names = ["zebra", "giraffe", "kettle", "lamp post"]  # none in the run's text store
    with running(build_app(predictor=predictor)) as url:
        with ThreadPoolExecutor(len(new_names)) as pool:
            answers = list(pool.map(lambda n: post_photo(url, data=_png(), names=f"cat, {n}", mode="resize"),
                                    new_names))
    assert [status for status, _ in answers] == [200] * len(new_names)
    assert [[m["name"] for m in a["masks"]] for _, a in answers] == [["cat", n] for n in new_names]
    # One model, one vision tower at start, one text tower at the first new name: never again per request.
    assert calls == {"load_model": 1, "create_encoder": 2}
    assert most[0] == 1  # one photo at a time through the run


def test_a_full_queue_says_busy_and_the_running_request_finishes(predictor):
    entered, release = threading.Event(), threading.Event()
    blocking = Predictor.__new__(Predictor)
    blocking.__dict__.update(predictor.__dict__)

    def slow(**kwargs):
        entered.set()
        release.wait(60)
        return predictor.predict(**kwargs)

    blocking.predict = slow
    with running(build_app(predictor=blocking, limits=ServeLimits(max_waiting=0))) as url:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post_photo, url, data=_png(), mode="resize")
            assert entered.wait(60)
            _assert_one_line_error(*post_photo(url, data=_png(), mode="resize"), 503, "busy")
            release.set()
            status, answer = first.result(timeout=120)
    assert status == 200 and len(answer["masks"]) == 2


def test_bad_uploads_are_one_line_on_the_page(predictor, served):
    _assert_one_line_error(*post_photo(served, data=b"plain text, no pixels", filename="notes.txt"), 400,
                           "notes.txt is not an image")
    _assert_one_line_error(*post_photo(served, data=_png()[:60], filename="cut.png"), 400, "cannot read image cut.png")
    _assert_one_line_error(*post_photo(served, data=b"", filename="empty.jpg"), 400, "empty.jpg is empty")
    _assert_one_line_error(*post_photo(served, data=None), 400, "choose a photo")
    _assert_one_line_error(*post_photo(served, data=_png(), names=" , "), 400, "at least one class name")
    _assert_one_line_error(*post_photo(served, data=_png(), names="cat, cat"), 400, "repeated: cat")
    _assert_one_line_error(*post_photo(served, data=_png(), mode="tiles"), 400, "windows or resize")
    small = ServeLimits(max_upload_mb=0.05, max_pixels=5000)  # 52 KB, 5000 pixels
    with running(build_app(predictor=predictor, limits=small)) as url:
        noise = np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
        _assert_one_line_error(*post_photo(url, data=noise, filename="big.jpg"), 413,
                               "this server takes photos up to 0.05 MB")
        _assert_one_line_error(*post_photo(url, data=_png(80, 96), filename="wide.png"), 400,
                               "wide.png is 96 x 80 pixels; at most 0.005 megapixels")


def test_an_unexpected_failure_is_one_line_and_the_log_has_the_trace(predictor, caplog):
    broken = Predictor.__new__(Predictor)
    broken.__dict__.update(predictor.__dict__)
    broken.predict = lambda **kwargs: 1 / 0
    with running(build_app(predictor=broken)) as url:
        _assert_one_line_error(*post_photo(url, data=_png()), 500, "the prediction failed on the server")
    assert "ZeroDivisionError" in caplog.text


def test_the_page_says_what_the_run_is_and_that_it_is_random_init(served, learned):
    status, page = get(served)
    assert status == 200 and 'id="caveat"' in page and 'type="file"' in page
    info = json.loads(get(served + "api/run")[1])
    assert info["run"] == learned.name and info["pretrained"] is False
    assert "random-init" in info["notes"][0] and info["examples"] and info["max_upload_mb"] == 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sigint(handler):
    return lambda: signal.signal(signal.SIGINT, handler)


@pytest.mark.processes
@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["terminal", "sigint-ignored-at-start"])
def test_fusioner_serve_listens_on_localhost_and_stops_on_ctrl_c(learned, sigint):
    """Stopped by SIGINT, whether Python turns it into KeyboardInterrupt or the process started with it
    ignored (a background job of a script; pytest-xdist's workers too): uvicorn stops either way."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-c", "import sys; from cli import main; sys.exit(main())", "serve",
                                str(learned), "--port", str(port), "-q"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_sigint(sigint))
    try:
        first = process.stdout.readline()
        assert re.fullmatch(rf"serving {re.escape(str(learned))} at http://127\.0\.0\.1:{port}/  \(Ctrl\+C stops\)\n",
                            first), first + process.stderr.read() if process.poll() is not None else first
        assert "random-init" in process.stdout.readline()
        url, info = f"http://127.0.0.1:{port}/", None
        for _ in range(300):  # the socket is bound before uvicorn listens on it: wait for the first answer
            try:
                info = json.loads(get(url + "api/run")[1])
                break
            except OSError:
                time.sleep(0.1)
        assert info is not None and info["pretrained"] is False
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0 and process.stdout.read() == "stopped\n"
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_mistakes_exit_2_with_one_line(learned, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(learned), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    for words, message in ((["serve", str(tmp_path / "nope"), "--port", "0"], "nope"),
                           (["serve", str(learned), "--port", "70000"], "--port is 0 (any free port) to 65535"),
                           (["serve", str(learned), "--host", "192.0.2.1"], "cannot listen on 192.0.2.1:7860"),
                           (["serve", str(learned), "--max-upload-mb", "0"], "--max-upload-mb must be positive")):
        assert main(words) == 2, words
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
