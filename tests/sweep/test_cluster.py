"""Where a sweep runs: the threads each run of a local cluster gets."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.processes  # a real LocalCluster


def test_a_local_sweep_gives_each_run_the_threads_omp_num_threads_allows(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pipeline.sweep.cluster import open_cluster

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))
    study = SimpleNamespace(out=tmp_path)
    with open_cluster(study=study, scheduler=None, slurm=False, jobs=1, gpus_per_job=1, workers=1,
                      quiet=True) as (_, threads, gpus):
        assert threads == 1 and gpus is None  # 4 cores for one run, but the variable says one thread each
