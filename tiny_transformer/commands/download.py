"""`python -m tiny_transformer download [all|shakespeare|simple]`: put the course data in data/.

    download                  both datasets (the default)
    download shakespeare      Tiny Shakespeare, verified (size + sha256), written atomically
    download simple           data/simple_sequences.txt (deterministic synthetic tasks)

Offline: `--source PATH_OR_URL` (a local file, file:// or http(s):// URL) or the environment
variable TINY_SHAKESPEARE_SOURCE. `data/download_shakespeare.sh` calls `main()` below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tiny_transformer import download
from tiny_transformer.utils import data_dir

DATASETS = ("all", "shakespeare", "simple")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dataset", nargs="?", default="all", choices=DATASETS,
        help="which dataset to prepare (default: all)",
    )
    parser.add_argument(
        "--source", default=None, metavar="PATH_OR_URL",
        help="where to get Tiny Shakespeare: a local file, file:// or http(s):// URL "
        f"(default: ${download.SOURCE_ENV} if set, else {download.SHAKESPEARE_URL})",
    )
    parser.add_argument(
        "--force", action="store_true", help="fetch Tiny Shakespeare again even if a valid copy exists"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, metavar="DIR",
        help="folder to write to (default: $TINY_TRANSFORMER_DATA or <repo>/data)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    parser.add_argument("--retries", type=int, default=3, help="download attempts in all")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run(args: argparse.Namespace) -> int:
    if args.source is not None and args.dataset == "simple":
        raise ValueError("--source only applies to Tiny Shakespeare; use `download shakespeare`")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.retries < 1:
        raise ValueError(f"--retries must be at least 1, got {args.retries}")
    folder = args.data_dir if args.data_dir is not None else data_dir()
    if args.dataset in ("all", "shakespeare"):
        download.ensure_shakespeare(
            folder / download.SHAKESPEARE_FILENAME, source=args.source, force=args.force,
            quiet=args.quiet, timeout=args.timeout, retries=args.retries,
        )
    if args.dataset in ("all", "simple"):
        download.make_simple_sequences(
            folder / download.SIMPLE_SEQUENCES_FILENAME, quiet=args.quiet
        )
    return 0
