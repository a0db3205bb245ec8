"""`python -m tiny_transformer bench native|train|sample ...`: the project's benchmarks.

* `native`: speed of the C engine (native/run.c) against this core's measured peak and memory
  bandwidth (tiny_transformer.native_bench).
* `train`: training quality and throughput (tiny_transformer.bench_train).
* `sample`: sampling speed with and without the KV cache (tiny_transformer.bench_sample).

Each benchmark lives in its own module; a missing one is listed as not available.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "native": ("tiny_transformer.native_bench", "C inference speed vs this core's peak and memory bandwidth"),
    "train": ("tiny_transformer.bench_train", "training quality and throughput"),
    "sample": ("tiny_transformer.bench_sample", "sampling speed (KV cache vs recomputation)"),
}


def _module(name: str):
    try:
        return importlib.import_module(BENCHMARKS[name][0])
    except ModuleNotFoundError as exc:
        if exc.name == BENCHMARKS[name][0]:
            return None
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (_, help_text) in BENCHMARKS.items():
        module = _module(name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        if module is not None:
            module.add_arguments(p)
        p.set_defaults(_bench=name)


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "_bench", None)
    if name is None:
        print("choose a benchmark: " + ", ".join(f"{n} ({h})" for n, (_, h) in BENCHMARKS.items()))
        print("e.g. python -m tiny_transformer bench native")
        return 2
    module = _module(name)
    if module is None:
        print(f"the {name} benchmark is not available in this installation ({BENCHMARKS[name][0]} is missing)")
        return 1
    return int(module.main(args) or 0)
