"""The benchmark suite's entry point: `python -m bench [--dsn DSN] [--only N ...]`."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from collections.abc import Callable, Sequence

from bench import process
from bench.common import Figure, Server, open_server, say

# number -> (title, module name, default runs)
BENCHMARKS: dict[int, tuple[str, str, int]] = {
    1: ("throughput: 20 batches x 1,000 documents, no-op extractor", "throughput", 5),
    2: (
        "latency: commit to extractor start, 500 single-document batches",
        "latency",
        5,
    ),
    3: ("scale: claims and sweeps, 1,000,000 finished documents vs none", "scale", 5),
    4: ("upload cost: 4 uploaders, notification triggers on vs off", "upload", 5),
    5: ("memory: listener peak RSS through a 100,000-document batch", "memory", 3),
}


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the benchmark command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the listener; each prints median and min-max.",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("BENCH_DSN"),
        help="admin DSN of a server where scratch databases may be created "
        "(default: $BENCH_DSN, else a private embedded pgserver)",
    )
    parser.add_argument(
        "--only",
        type=int,
        nargs="+",
        choices=sorted(BENCHMARKS),
        help="run only these benchmarks (default: all)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs per benchmark (default: 5, 3 for memory)",
    )
    parser.add_argument(
        "--listener-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra option for every `listener run` (repeatable), "
        "e.g. --listener-arg=--claim-size=500",
    )
    return parser


def _load(module: str) -> Callable[[Server, int], list[Figure]]:
    imported = __import__(f"bench.{module}", fromlist=["run"])
    runner: Callable[[Server, int], list[Figure]] = imported.run
    return runner


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks and print their figures."""
    args = build_parser().parse_args(argv)
    chosen = args.only or sorted(BENCHMARKS)
    process.LISTENER_ARGS[:] = args.listener_arg
    with open_server(args.dsn) as server:
        settings = server.settings()
        say(
            f"# listener benchmarks, {datetime.datetime.now():%Y-%m-%d %H:%M}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}"
        )
        if args.listener_arg:
            say(f"# listener run options: {' '.join(args.listener_arg)}")
        say(
            "# PostgreSQL "
            + ", ".join(f"{name}={value}" for name, value in settings.items())
        )
        results: list[tuple[int, list[Figure], str, str]] = []
        for number in chosen:
            title, module, default_runs = BENCHMARKS[number]
            runs = args.runs or default_runs
            before = _load_average()
            say(f"\n## {number}. {title} ({runs} runs; load average {before})")
            figures = _load(module)(server, runs)
            after = _load_average()
            for figure in figures:
                say(figure.describe())
            results.append((number, figures, before, after))

    say("\n# summary (median, min-max)")
    for number, figures, before, after in results:
        say(f"{number}. {BENCHMARKS[number][0]} [load {before} -> {after}]")
        for figure in figures:
            say(f"   {figure.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
