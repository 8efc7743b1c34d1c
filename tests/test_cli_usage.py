"""Usage errors, conventions and the shared error wrapper of every entry point.

A dependency upgrade (typer vendoring its own click, say) must never bring tracebacks back:
each kind of usage mistake is checked here against the real parser of each entry point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cli import main
from pipeline import __version__
from pipeline.errors import UserError, is_usage_error, run_entry

ROOT = Path(__file__).resolve().parents[1]


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


@pytest.mark.parametrize(("args", "needle"), [
    ([], "Usage: fusioner"),                                    # no command at all
    (["extract"], "Missing option '--backbone'"),              # a required option left out
    (["train", "--bogus"], "No such option: --bogus"),          # an unknown option
    (["eval"], "Missing argument"),                             # a required argument left out
    (["extract", "-b", "clip-b", "--views", "many"], "Invalid value for '--views'"),  # a value of the wrong type
    (["frobnicate"], "No such command 'frobnicate'"),           # an unknown command
    (["train", "--cache"], "requires an argument"),             # an option without its value
])
def test_usage_errors_exit_2_without_a_traceback(capsys, args, needle):
    assert main(args) == 2
    captured = capsys.readouterr()
    _no_traceback(captured.err + captured.out)
    assert needle in captured.err + captured.out


def test_user_error_is_one_line_and_verbose_adds_the_traceback(tmp_path, capsys):
    missing = tmp_path / "absent"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "no feature store" in err
    for args in (["info", str(missing), "-v"], ["-v", "info", str(missing)], ["info", "--verbose", str(missing)]):
        assert main(args) == 2, args  # -v is accepted after the command name too
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: no feature store"), args


@pytest.mark.parametrize("args", [["-q", "encoders"], ["encoders", "-q"], ["encoders", "--quiet", "-v"]])
def test_global_flags_before_or_after_the_command(capsys, args):
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("name")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fusioner {__version__}"


@pytest.mark.parametrize("command", ["extract", "train", "eval", "predict", "serve", "sweep", "demo", "info"])
def test_help_shows_defaults_and_readable_types(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "[default: " in out or command == "info"  # info has no option with a value
    assert "<" not in out.replace("<backbone>", "").replace("<image stem>", ""), out  # no <list[str]>, <bool>
    assert "KEY=VALUE" in out or command not in ("train", "sweep")


def test_root_help_offers_shell_completion(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--install-completion" in out and "--version" in out


@pytest.mark.parametrize("names", ['say "hi", it\'s', "a=b, c,d", "[x], {y}: z"])
def test_class_names_travel_verbatim_as_values(capsys, names):
    """Names holding quotes, '=' or YAML syntax reach the config unchanged (no key=value strings on the way)."""
    assert main(["train", "--protocol", "custom", "--novel", names, "--cache", "some/where, odd'", "--print-config",
                 "--set", "optim.epochs=3", "--set", "optim.warmup_epochs=1", "--set", 'data.text_cache="quoted" store']) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["data"]["novel"] == [n.strip() for n in names.split(",")]
    assert config["data"]["cache"] == "some/where, odd'"
    assert config["optim"]["epochs"] == 3 and config["data"]["text_cache"] == '"quoted" store'


def test_set_wins_over_named_options(capsys):
    assert main(["train", "--fold", "1", "--set", "data.fold=2", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["fold"] == 2


def test_old_eval_splits_spelling_still_works_with_a_note(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-run"), "--splits", str(tmp_path)]) == 2  # parsed, then the run is missing
    err = capsys.readouterr().err
    assert "--splits is deprecated, use --episode-lists" in err and "error: " in err


# ------------------------------ the shared wrapper ------------------------------ #


def _fake_click_error(module: str):
    """A usage error from a click copy the wrapper has never seen (as a vendored click would be)."""
    namespace = types.SimpleNamespace()

    class ClickException(Exception):
        exit_code = 1

        def show(self):
            print(f"Error: {self}", file=sys.stderr)

    class UsageError(ClickException):
        exit_code = 2

    for cls in (ClickException, UsageError):
        cls.__module__ = module
    namespace.UsageError = UsageError
    return namespace


@pytest.mark.parametrize("module", ["click.exceptions", "typer._click.exceptions", "vendor.click9.exceptions"])
def test_wrapper_knows_usage_errors_from_any_click(capsys, module):
    errors = _fake_click_error(module)

    def command():
        raise errors.UsageError("No such option: --x")

    assert is_usage_error(errors.UsageError("x"))
    assert run_entry(command) == 2
    assert capsys.readouterr().err.strip() == "Error: No such option: --x"


def test_wrapper_with_the_installed_clicks(capsys):
    import click

    import typer

    raised = []
    for app_click in filter(None, [click, getattr(sys.modules.get("typer._click"), "core", None) and
                                   sys.modules["typer._click"]]):
        def command(app_click=app_click):
            raise app_click.exceptions.UsageError("bad usage")
        raised.append(run_entry(command))
    assert raised and set(raised) == {2}
    assert run_entry(lambda: (_ for _ in ()).throw(typer.Exit(3))) == 3
    assert run_entry(lambda: (_ for _ in ()).throw(typer.Abort())) == 130
    _no_traceback(capsys.readouterr().err)


def test_wrapper_user_error_argparse_and_plain_returns(capsys):
    def user():
        raise UserError("first line\nsecond line")

    assert run_entry(user) == 2
    assert capsys.readouterr().err.strip() == "error: first line (+1 more lines; --verbose shows them)"
    assert run_entry(lambda: argparse.ArgumentParser(prog="p").parse_args(["--nope"])) == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err
    assert run_entry(lambda: None) == 0 and run_entry(lambda: 1) == 1
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: it keeps its traceback
        run_entry(lambda: 1 / 0)


# --------------------------- the other entry points ---------------------------- #


@pytest.mark.parametrize(("module", "args", "needle"), [
    ("pipeline.sweep.command", [], "the following arguments are required"),
    ("pipeline.sweep.command", ["study", "absent.yaml"], "error: study file not found: absent.yaml (shipped studies: cache-vs-online, modern, table1"),
    ("pipeline.sweep.command", ["study", "x.yaml", "--jobs", "two"], "invalid int value"),
    ("pipeline.sweep.worker", [], "error: usage: python -m pipeline.sweep.worker"),
    ("pipeline.sweep.worker", ["run", "dir", "--threads", "z"], "error: --threads expects a whole number"),
    ("pipeline.bench.__main__", [], "error: usage: python -m pipeline.bench"),
    ("pipeline.bench.__main__", ["bogus"], "error: unknown benchmark 'bogus'"),
    ("pipeline.bench.__main__", ["extract", "--nope"], "unrecognized arguments"),
    ("pipeline.bench.__main__", ["train", "--steps", "x"], "invalid int value"),
    ("pipeline.bench.__main__", ["sweep", "--runs"], "expected one argument"),
])
def test_every_entry_point_exits_2_on_usage_errors(capsys, module, args, needle):
    import importlib

    entry = importlib.import_module(module).main
    code = entry(args) if module != "pipeline.bench.__main__" else run_entry(lambda: entry(args))
    assert code == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert needle in err, err


@pytest.mark.processes
@pytest.mark.parametrize("module", ["pipeline.bench", "pipeline.sweep", "pipeline.sweep.worker"])
def test_python_m_entry_points_exit_2(module):
    proc = subprocess.run([sys.executable, "-m", module, "--bogus-option"], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    _no_traceback(proc.stderr)


@pytest.mark.parametrize(("sets", "needle"), [
    (["optim.epochs=5"], "optim.warmup_epochs (10) must be from 0 to below optim.epochs (5)"),
    (["optim.epochs=4", "optim.warmup_epochs=4"], "optim.warmup_epochs (4) must be from 0 to below"),
    (["optim.epochs=0", "optim.warmup_epochs=0"], "optim.epochs and optim.batch_size must be at least 1, got 0 and"),
])
def test_a_schedule_that_ends_in_warm_up_is_one_line(capsys, sets, needle):
    assert main(["train", "--print-config", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


# Every command that draws progress, the library function it hands ``quiet`` to, and its smallest arguments.
PROGRESS_COMMANDS = [
    ("extract", "pipeline.encode.extract", "extract", ["--backbone", "test-vit", "--out", "s"]),
    ("train", "pipeline.runs", "train_from_settings", ["--cache", "c"]),
    ("eval", "pipeline.eval.report", "evaluate_runs", ["runs/x"]),
    ("predict", "pipeline.eval.predict", "predict_photo", ["photo.jpg", "--classes", "cat", "--checkpoint", "r"]),
    ("sweep", "pipeline.sweep.command", "sweep_command", ["tiny"]),
    ("demo", "pipeline.demo", "run_demo", []),
    ("serve", "pipeline.serve.server", "serve", ["runs/x", "--port", "0"]),
]


class _Called(Exception):
    pass


@pytest.mark.parametrize(("command", "module", "function", "args"), PROGRESS_COMMANDS,
                         ids=[c[0] for c in PROGRESS_COMMANDS])
@pytest.mark.parametrize("where", ["before", "after", "neither"])
def test_quiet_reaches_every_command_before_or_after_its_name(monkeypatch, command, module, function, args, where):
    """``fusioner -q predict ...`` once drew its progress bar anyway: the global flag was not passed on."""
    import importlib

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        raise _Called

    monkeypatch.setattr(importlib.import_module(module), function, record)
    argv = {"before": ["-q", command, *args], "after": [command, *args, "-q"], "neither": [command, *args]}[where]
    with pytest.raises(_Called):
        main(argv)
    quiet = seen["quiet"] if "quiet" in seen else not seen["progress"]
    assert quiet is (where != "neither"), seen


@pytest.mark.parametrize(("args", "shown", "hidden"), [
    (["extract", "--backbone", "test-vit", "--random-init", "--dataset", "folder", "--data-root", "{data}",
      "--render-workers", "-1", "--out", "{out}"], "--render-workers must be at least 0", "`render_workers`"),
    (["extract", "--backbone", "test-vit", "--random-init", "--dataset", "folder", "--data-root", "{data}",
      "--split", "val", "--fold", "1", "--out", "{out}"], "--fold picks the folds of --episodes", "episode_folds"),
    (["extract", "--backbone", "test-vit", "--weights", "{data}", "--random-init", "--text-only", "--dataset", "voc",
      "--out", "{out}"], "--weights and --random-init exclude each other", "`weights`"),
    (["sweep", "{out}", "--runs-per-gpu", "0"], "--runs-per-gpu must be a whole number of at least 1", "runs_per_gpu"),
])
def test_library_messages_show_the_flags_of_the_command_that_ran(tmp_path, capsys, args, shown, hidden):
    """The library names its settings (`render_workers`); the command line shows the flag that was typed."""
    from synthetic_data import write_folder_dataset

    data = write_folder_dataset(tmp_path / "data")
    args = [a.format(data=data, out=tmp_path / "store") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert shown in err and hidden not in err and err.count("\n") == 1, err


def test_the_sweep_module_entry_shows_its_own_flags(capsys):
    from pipeline.sweep.command import main as sweep_main

    assert sweep_main(["study", "no-such.yaml", "--runs-per-gpu", "0"]) == 2
    err = capsys.readouterr().err
    assert "--runs-per-gpu must be a whole number of at least 1" in err and "runs_per_gpu" not in err, err
