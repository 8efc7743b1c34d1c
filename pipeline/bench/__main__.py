"""``python -m pipeline.bench {extract,train,sweep,datapath,gpu,caching,planted,fidelity} [options]``: the
benchmarks behind docs/benchmarks.md and docs/training.md.

- ``extract``: encoder forward vs. whole extraction, then cache read speed;
- ``datapath``: render processes, shard writers and the streaming loader against raw disk speed;
- ``gpu``: the one GPU check (extract, stream-train, evaluate), one JSON line;
- ``train``: a cached training step vs. one running the encoder online, loader wait, cost per pair;
- ``sweep``: the same runs through a 2-worker sweep and in one process;
- ``caching``: the cache-vs-online table of a finished ``cache-vs-online`` study;
- ``planted``: the zero-shot check on planted features (held-out classes against two controls);
- ``fidelity``: float16 store vs float32 features, and the fusion module's two initialisations.
"""

import sys

from pipeline.errors import UserError, run_entry
from pipeline.host import keep_freed_memory

COMMANDS = ("extract", "train", "sweep", "datapath", "gpu", "caching", "planted", "fidelity")
USAGE = f"usage: python -m pipeline.bench {{{','.join(COMMANDS)}}} [--help | options]"


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        raise UserError(USAGE if not argv else f"unknown benchmark {argv[0]!r} ({USAGE})")
    keep_freed_memory()  # as the command line: the benchmarks measure what `fusioner` runs
    if argv[0] == "extract":
        from pipeline.bench.extract import main as run
        return run(argv)
    if argv[0] == "train":
        from pipeline.bench.train import main as run
    elif argv[0] == "caching":
        from pipeline.bench.caching import main as run
    elif argv[0] == "datapath":
        from pipeline.bench.datapath import main as run
    elif argv[0] == "gpu":
        from pipeline.bench.gpu import main as run
    elif argv[0] == "planted":
        from pipeline.bench.planted import main as run
    elif argv[0] == "fidelity":
        from pipeline.bench.fidelity import main as run
    else:
        from pipeline.bench.sweep import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(run_entry(lambda: main(sys.argv[1:])))
