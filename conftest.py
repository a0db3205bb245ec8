"""Pytest configuration shared by tests/ and notebooks/.

Notebooks run in *fast mode* under pytest: every training cell shrinks its steps and sizes when
TINY_TRANSFORMER_FAST=1. Setting it here (before nbval starts a kernel) means the README's one test
command needs no extra environment. Export TINY_TRANSFORMER_FAST=0 to run notebooks in full mode.
"""

import os

os.environ.setdefault("TINY_TRANSFORMER_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
