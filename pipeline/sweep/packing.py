"""Several runs per GPU: each run reserves its estimated peak memory as a dask worker resource.

With ``--runs-per-gpu N`` every worker has N threads (so up to N runs at once) and a resource,
:data:`RESOURCE`, that holds its device's memory in MiB, measured when the worker starts
(:class:`DeviceMemory`): ``torch.cuda.mem_get_info``'s free memory of the worker's GPU, the
host's available memory on a CPU worker, or :data:`MEMORY_VARIABLE` where it is set (to leave
headroom on a shared card, or in tests). Each run's task asks for its estimated peak
(:func:`pipeline.training.memory.training_memory`, from its config), so dask's own resource
accounting never starts more runs on a worker than its memory holds. A run estimated above
every worker's memory is refused before anything runs.

A run whose process dies of out-of-memory (:data:`pipeline.sweep.worker.OOM_EXIT`) is retried once
with the whole memory of the worker it died on reserved, so no run shares the device with it;
out of memory alone fails the run at once (``--retries`` would run out of memory the same way).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.errors import UserError

RESOURCE = "fusioner_memory"  # MiB; the name dask reads from DASK_DISTRIBUTED__WORKER__RESOURCES__FUSIONER_MEMORY
MEMORY_VARIABLE = "FUSIONER_DEVICE_MEMORY"
MIB = 1 << 20

_PROBE = ("import json, torch\n"
          "if torch.cuda.is_available():\n"
          "    free, total = torch.cuda.mem_get_info()\n"
          "    name = torch.cuda.get_device_name()\n"
          "    print(json.dumps({'kind': 'cuda', 'free': free, 'total': total, 'name': name}))\n"
          "else:\n"
          "    print(json.dumps({'kind': 'cpu'}))\n")


def parse_memory(text: str, *, where: str = MEMORY_VARIABLE) -> int:
    """Bytes from ``8GB``, ``512MiB`` or a plain number of bytes; a one-line error otherwise."""
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(str(text).strip())
    except (ValueError, TypeError):
        raise UserError(f"{where}: cannot read {text!r} as a memory size (e.g. 40GB, 512MiB)") from None
    if value <= 0:
        raise UserError(f"{where}: a memory size must be above 0, got {text!r}")
    return int(value)


def measure_device(*, gpu: str | None, environ: dict | None = None) -> dict:
    """{'kind': 'cuda'|'cpu', 'bytes': usable memory, 'source': how it was found} of one worker's device."""
    import psutil

    environ = dict(os.environ if environ is None else environ)
    if gpu is not None:
        environ["CUDA_VISIBLE_DEVICES"] = gpu
    # In a process of its own: a CUDA context made here would stay on the GPU for the whole sweep.
    done = subprocess.run([sys.executable, "-c", _PROBE], env=environ, capture_output=True, text=True, timeout=300)
    probe = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else {}
    kind = "cuda" if probe.get("kind") == "cuda" else "cpu"
    if environ.get(MEMORY_VARIABLE):
        return {"kind": kind, "bytes": parse_memory(environ[MEMORY_VARIABLE]), "source": MEMORY_VARIABLE}
    if kind == "cuda":  # whole GiB, so that cards of one kind offer the same figure
        return {"kind": kind, "bytes": int(probe["free"]) // (1 << 30) << 30,
                "source": f"free memory of {probe['name']} at start ({probe['total'] / 2**30:.0f} GiB card)"}
    return {"kind": kind, "bytes": int(psutil.virtual_memory().available), "source": "available host memory"}


class DeviceMemory(WorkerPlugin):
    """Measures the worker's device memory once and offers it as the worker resource :data:`RESOURCE`."""

    name = "fusioner-device-memory"

    def __init__(self, gpus: list[str] | None = None) -> None:
        self.gpus = gpus
        self.device: dict | None = None

    async def setup(self, worker) -> None:
        from pipeline.sweep.worker import pick_gpu

        given = worker.state.total_resources.get(RESOURCE)
        if given:  # started with it (``dask worker --resources fusioner_memory=MIB``): the user knows best
            self.device = {"kind": "given", "bytes": int(given) * MIB, "source": f"the worker's {RESOURCE} resource"}
            return
        visible = self.gpus if self.gpus is not None else [
            d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        gpu = pick_gpu(worker_name=worker.name, visible=visible)
        self.device = await asyncio.get_running_loop().run_in_executor(None, lambda: measure_device(gpu=gpu))
        await worker.set_resources(**{RESOURCE: self.device["bytes"] // MIB})


def _worker_device(dask_worker) -> dict | None:
    plugin = dask_worker.plugins.get(DeviceMemory.name)
    device = dict(plugin.device) if plugin is not None and plugin.device else None
    if device is not None:
        device["nthreads"] = dask_worker.state.nthreads
    return device


def worker_devices(client, *, gpus: list[str] | None) -> dict[str, dict]:
    """Worker address -> its measured device, after making every worker measure it (and those joining later).

    Waits for a first worker (SLURM jobs may still be queued).
    """
    client.wait_for_workers(1)
    client.register_plugin(DeviceMemory(gpus), name=DeviceMemory.name)
    devices = {address: device for address, device in client.run(_worker_device).items() if device}
    if not devices:
        raise UserError("--runs-per-gpu: no worker of the cluster reported its device memory")
    return devices


def plan_memory(*, runs: list, devices: dict[str, dict]) -> dict[str, int]:
    """Run key -> MiB its task reserves; a run that fits no worker's device even alone is a one-line error."""
    from pipeline.sweep.estimate import run_peak_mib

    largest = max(device["bytes"] for device in devices.values()) // MIB
    kind = "cpu" if all(device["kind"] == "cpu" for device in devices.values()) else "cuda"
    memo: dict = {}
    plan = {}
    for run in runs:
        need = run_peak_mib(run, device_type=kind, memo=memo)
        if need is not None and need > largest:
            source = next(iter(devices.values()))["source"]
            raise UserError(f"{run.describe()}: needs about {need:,} MiB of device memory by its config, more than "
                            f"any worker has ({largest:,} MiB, {source}); lower optim.batch_size, or run with "
                            f"--runs-per-gpu 1, which starts runs without this check")
        plan[run.key] = largest if need is None else need
    return plan


def schedule_unrunnable(dask_scheduler) -> int:
    """On the scheduler: offer tasks waiting for a resource to workers that gained it since they joined.

    A worker measures its memory after it registers, and dask looks for workers for a waiting
    task only when one joins; run periodically by the sweep (``client.run_on_scheduler``).
    """
    import time

    waiting = len(dask_scheduler.unrunnable)
    for worker in list(dask_scheduler.running) if waiting else []:
        recommendations = dask_scheduler.bulk_schedule_unrunnable_after_adding_worker(worker)
        if recommendations:
            dask_scheduler.transitions(recommendations, stimulus_id=f"fusioner-memory-{time.time()}")
    return waiting
