"""``python -m pipeline.bench {extract,train,sweep,datapath,gpu} [options]``: the benchmarks behind docs/benchmarks.md.

- ``extract``: encoder forward vs. whole extraction, then cache read speed;
- ``datapath``: render processes, shard writers and the streaming loader against raw disk speed;
- ``gpu``: the one GPU check (extract, stream-train, evaluate), one JSON line;
- ``train``: a cached training step vs. one running the encoder online, loader wait, cost per pair;
- ``sweep``: the same runs through a 2-worker sweep and in one process.
"""

import sys

COMMANDS = ("extract", "train", "sweep", "datapath", "gpu")
USAGE = f"usage: python -m pipeline.bench {{{','.join(COMMANDS)}}} [--help | options]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip() if argv[:1] in (["-h"], ["--help"]) else USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if argv[0] == "extract":
        from pipeline.bench.extract import main as run
        return run(argv)
    if argv[0] == "train":
        from pipeline.bench.train import main as run
    elif argv[0] == "datapath":
        from pipeline.bench.datapath import main as run
    elif argv[0] == "gpu":
        from pipeline.bench.gpu import main as run
    else:
        from pipeline.bench.sweep import main as run
    return run(argv[1:])


sys.exit(main(sys.argv[1:]))
