"""What runs on a sweep worker: one process per run, forked from a preloaded launcher.

Every run trains and evaluates in its own process, so the GPU memory it took
(and whatever a long-lived process would leak) is returned when it exits.
Starting a fresh Python for each run costs seconds of imports (torch, the
torch.compile machinery AdamW pulls in, matplotlib): the *launcher* pays them
once per worker and forks one child per run. It never touches CUDA, so each
child initialises CUDA itself, on the one GPU that its ``CUDA_VISIBLE_DEVICES``
names. The kernel ends a child when its launcher dies, and a launcher when its
worker dies (a worker killed at walltime, or a killed sweep, must not leave an
orphan training). A child holds its run directory's lock while it works,
resumes from the run's last checkpoint, and writes ``done.json`` last.

``python -m pipeline.sweep.worker run DIR`` runs one prepared run by hand in a
fresh process (for debugging a failed run); ``launcher`` is the preloaded
process the sweep's workers start.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import write_json_atomic
from pipeline.errors import UserError, run_entry
from pipeline.host import keep_freed_memory
from pipeline.sweep.study import read_marker

PRELOAD = ("torch", "torch._dynamo", "matplotlib.pyplot", "zarr", "safetensors.torch", "pipeline.training.loop",
           "pipeline.eval.evaluate", "pipeline.plots")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
OOM_EXIT = 3  # a run process's exit code when it ran out of memory: a retry alone on the device may help


def _poll_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(137)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` (the pid of the process that started it) exits.

    On Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` kills us the moment the
    parent exits, even while we are stopped or busy, so a killed sweep leaves no run writing
    checkpoints behind it. The signal follows the parent *thread* that started us, so parents
    start children from a thread that lives as long as they do. A parent that died before the
    prctl (the fork window) is no longer our ``getppid()``: then we leave at once. Elsewhere a
    thread polls for the parent every half second.
    """
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:
        os._exit(137)
    if not armed:
        _poll_parent(parent)


@contextmanager
def run_lock(run_dir: Path):
    """One writer per run directory, whoever started it; the OS drops the lock when its holder dies."""
    with open(run_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{run_dir}: another process holds this run; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def training_finished(*, run_dir: Path, config) -> bool:
    """True once the last step is checkpointed, so a run killed during evaluation never trains again."""
    from pipeline.training.checkpoints import latest_checkpoint, load_train_state

    if (run_dir / "summary.json").is_file() and (run_dir / "model.safetensors").is_file():
        return True
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return False
    position = load_train_state(checkpoint, map_location="cpu")["position"]
    optim = config.optim
    return bool(optim.max_steps and position["step"] >= optim.max_steps) or position["epoch"] >= optim.epochs


def _evaluate(*, run_dir: Path, config, evals: dict, device) -> dict:
    """Score the run; ``multiclass`` (Mosaic-4) scores every class of the evaluation masks, fold-free."""
    from pipeline.eval.evaluate import evaluate_split
    from pipeline.eval.identity import check_stores
    from pipeline.store.layout import open_store, store_attrs
    from pipeline.training.checkpoints import load_model

    model, _ = load_model(run_dir, device=device)
    text = config.data.text_store
    # An evaluation split normalised unlike the training views (Table 5 needs --normalize coco) fails the run.
    check_stores(run=run_dir, config=config, vision_store=config.data.cache, text_store=text, split=evals["split"])
    result = evaluate_split(model=model, vision_cache=config.data.cache, text_cache=text, split=evals["split"],
                            protocol=evals["protocol"] or config.data.protocol, fold=config.data.fold,
                            novel_names=list(config.data.novel), splits_dir=evals["splits_dir"], device=device,
                            mode=evals["mode"], limit=evals["limit"], quiet=True)
    text_pretrained = bool(store_attrs(open_store(text))["pretrained"])
    result["pretrained_features"] = bool(result["pretrained_features"]) and text_pretrained
    return result


def execute_run(*, run_dir: Path, threads: int | None = None, quiet: bool = True) -> dict:
    """Train (or resume) and evaluate the run described by ``run_dir/run.json``; done.json is written last."""
    import torch

    from pipeline.config import from_dict
    from pipeline.runtime import resolve_device
    from pipeline.training.checkpoints import latest_checkpoint
    from pipeline.training.config import TrainConfig
    from pipeline.eval.report import run_selection
    from pipeline.runs import train_and_validate

    run_dir = Path(run_dir).resolve()
    spec = read_marker(run_dir, "run.json")
    if spec is None:
        raise UserError(f"{run_dir}: no run.json (runs are prepared by `fusioner sweep STUDY`)")
    with run_lock(run_dir):
        done = read_marker(run_dir, "done.json")
        if done is not None:
            return done
        if threads:
            torch.set_num_threads(threads)
        with open(run_dir / "attempts.log", "a") as log:
            log.write(f"start {time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} host {socket.gethostname()} "
                      f"gpu {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\n")
        config = from_dict(TrainConfig, spec["config"])
        config.out = str(run_dir)
        tick = time.perf_counter()
        resumed = latest_checkpoint(run_dir) is not None  # an earlier process got this far
        if not training_finished(run_dir=run_dir, config=config):
            train_and_validate(config=config, resume=resumed, quiet=quiet)
        trained = time.perf_counter()
        result = _evaluate(run_dir=run_dir, config=config, evals=spec["eval"], device=resolve_device(config.device))
        record = {"key": spec["key"], **spec["labels"], "miou": result["miou"], "fb_iou": result["fb_iou"],
                  "episodes": result["episodes"], "per_class": result["per_class"],
                  "episode_source": result["episode_source"], "pretrained_features": result["pretrained_features"],
                  "selection": run_selection(run_dir), "resumed": resumed, "train_seconds": trained - tick,
                  "eval_seconds": time.perf_counter() - trained,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname()}
        (run_dir / "failed.json").unlink(missing_ok=True)
        write_json_atomic(run_dir / "done.json", record)
        return record


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device (or host allocator) running out of memory."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _run_and_exit(*, run_dir: str, threads: int | None) -> None:
    """The body of a run's process: exit code 0 done, 2 user error (retrying cannot help), 3 out of memory
    (:data:`OOM_EXIT`: a retry alone on the device may help), 1 anything else."""
    keep_freed_memory()  # each step reuses what the last one freed (pipeline.host)
    code = 1
    try:
        code = run_entry(lambda: execute_run(run_dir=Path(run_dir), threads=threads) and 0)
    except BaseException as err:  # noqa: BLE001 - the traceback goes to the run's log, the code to the sweep
        traceback.print_exc()
        if out_of_memory(err):
            code = OOM_EXIT
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --------------------------------------------------------------------------- #
# The launcher: imports once, forks a process per run
# --------------------------------------------------------------------------- #


def launcher_main(parent: int) -> None:
    """Preload, say ready, then for each request line on stdin fork a run and answer with its exit code.

    A killed worker (``parent``) takes its launcher with it, and the launcher its run: each run
    is forked from this main thread, which lives as long as the launcher, and arms its
    parent-death signal before anything else.
    """
    import matplotlib

    die_with_parent(parent)
    me = os.getpid()
    matplotlib.use("Agg")
    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            die_with_parent(me)
            log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.environ.update(request["env"])
            _run_and_exit(run_dir=request["run_dir"], threads=request["threads"])
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


def launcher_env() -> dict:
    """The worker's environment without what a dask nanny sets for its own worker processes.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (malloc hands memory back to the OS
    at once) and OMP/MKL/OpenBLAS capped at one thread. Inherited by a training run, the first
    made glibc return and re-fault memory on every step: 5x the system time of the same run
    started elsewhere, and half the sweep's throughput on 2 cores. Runs set their threads
    themselves (``--threads``), so both are dropped.
    """
    import dask

    env = dict(os.environ)
    for key, value in (dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}).items():
        if env.get(key) == str(value):
            env.pop(key)
    return env


class Launcher:
    """The worker's handle on one launcher process; runs go through it one at a time.

    Starting it (the fork) and waiting for it to be ready (its imports) are two steps, so the
    launchers of runs packed on one worker start from one long-lived thread and load in parallel.
    """

    def __init__(self) -> None:
        command = [sys.executable, "-m", "pipeline.sweep.worker", "launcher", str(os.getpid())]
        self.proc = subprocess.Popen(command, env=launcher_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = False

    def wait_ready(self) -> Launcher:
        if not self.ready and "ready" not in json.loads(self.proc.stdout.readline() or "{}"):
            self.close()
            raise RuntimeError("the run launcher failed to start (see the worker's log)")
        self.ready = True
        return self

    def run(self, *, run_dir: str, threads: int | None, env: dict, log: str) -> int:
        self.wait_ready()
        request = {"run_dir": run_dir, "threads": threads, "env": env, "log": log}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the run launcher died")
        return int(json.loads(answer)["code"])

    def close(self) -> None:
        """Stop the launcher; a run it is still waiting for is then killed by the kernel (see die_with_parent)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


# --------------------------------------------------------------------------- #
# GPU pinning
# --------------------------------------------------------------------------- #


def worker_slot(name) -> int | None:
    """The worker's index on its machine: LocalCluster names 0, 1, ...; jobqueue and --nworkers 'x-0', 'x-1'."""
    if isinstance(name, int):
        return name
    match = re.search(r"-(\d+)$", str(name))
    return int(match.group(1)) if match else None


def pick_gpu(*, worker_name, visible: list[str]) -> str | None:
    """The one GPU (of those visible to the worker) this worker's runs use; None to leave them all visible."""
    slot = worker_slot(worker_name)
    if len(visible) < 2 or slot is None:
        return None
    return visible[slot % len(visible)]


USAGE = "usage: python -m pipeline.sweep.worker run RUN_DIR [--threads N] | launcher [PARENT_PID]"


def _dispatch(args: list[str]) -> int:
    if args[:1] == ["launcher"] and len(args) <= 2:
        if len(args) == 2 and not args[1].isdigit():
            raise UserError(f"launcher expects a parent process id, not {args[1]!r} ({USAGE})")
        launcher_main(int(args[1]) if len(args) == 2 else os.getppid())
        return 0
    if len(args) in (2, 4) and args[0] == "run" and (len(args) == 2 or args[2] == "--threads"):
        if len(args) == 4 and not args[3].isdigit():
            raise UserError(f"--threads expects a whole number, not {args[3]!r} ({USAGE})")
        _run_and_exit(run_dir=args[1], threads=int(args[3]) if len(args) == 4 else None)
    raise UserError(USAGE)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.sweep.worker``; usage mistakes are one line with exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_entry(lambda: _dispatch(args))


if __name__ == "__main__":
    sys.exit(main())
