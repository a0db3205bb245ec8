"""Tests for setup/verify_environment.py: JSON mode, simulated failures, and the passing path here.

The script runs in a subprocess, as a learner runs it. Failures are simulated with its testing
hooks: TT_VERIFY_SIMULATE_MISSING (pretend packages are absent) and TT_VERIFY_CC (a fake compiler).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_transformer import download
from tiny_transformer.utils import repo_root

SCRIPT = repo_root() / "setup" / "verify_environment.py"
SHARED_SHAKESPEARE = next(
    (p for p in (Path(os.environ.get("TINY_SHAKESPEARE_SOURCE", "")),
                 repo_root().parent / "shared" / "data" / "tiny_shakespeare.txt") if p.is_file()),
    repo_root().parent / "shared" / "data" / "tiny_shakespeare.txt",
)


def load_script():
    spec = importlib.util.spec_from_file_location("verify_environment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


verify = load_script()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data folder holding a verified Tiny Shakespeare (the repo's, or one made from ../shared)."""
    folder = tmp_path_factory.mktemp("data")
    if download.verify_file(download.data_dir() / "tiny_shakespeare.txt"):
        shutil.copyfile(download.data_dir() / "tiny_shakespeare.txt", folder / "tiny_shakespeare.txt")
    elif SHARED_SHAKESPEARE.is_file():
        download.ensure_shakespeare(folder, source=SHARED_SHAKESPEARE, quiet=True)
    else:
        pytest.skip("no copy of Tiny Shakespeare (data/ or ../shared/data) to check against")
    return folder


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the script with extra environment variables; the output is read as UTF-8."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TT_VERIFY_")}
    full_env.update({"PYTHONIOENCODING": "utf-8", **env})
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          encoding="utf-8", env=full_env, timeout=300, check=False)


def by_name(document: dict) -> dict[str, dict]:
    return {check["name"]: check for check in document["checks"]}


def test_json_mode_passes_here(data_dir):
    result = run("--json", "--data-dir", str(data_dir))
    document = json.loads(result.stdout)  # stdout is the JSON document and nothing else
    assert result.returncode == 0, result.stdout
    assert document["ok"] is True
    checks = by_name(document)
    for name in ("Python", "torch", "device", "numpy>=1.24", "nbval>=0.11,<0.12",
                 "C compiler + cffi", "Tiny Shakespeare", "Jupyter kernel"):
        assert checks[name]["status"] == "ok", checks[name]
    for check in document["checks"]:
        assert set(check) == {"name", "status", "required", "detail", "fix"}
        assert check["status"] in {"ok", "fail", "warn"}
        assert not (check["required"] and check["status"] == "warn")
    assert checks["Python"]["required"] and not checks["device"]["required"]
    assert "compiled and called C through cffi" in checks["C compiler + cffi"]["detail"]
    assert "sha256 verified" in checks["Tiny Shakespeare"]["detail"]


def test_human_report_passes_here(data_dir):
    result = run("--data-dir", str(data_dir))
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tiny-transformer environment check")
    assert any(line.startswith("  ✓ Python") for line in lines)
    assert "✗" not in result.stdout
    assert lines[-1] == "All required checks passed."


def test_simulated_missing_package_fails_with_its_fix(data_dir):
    result = run("--data-dir", str(data_dir), TT_VERIFY_SIMULATE_MISSING="numpy")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("  ✗ numpy>=1.24"))
    assert "not installed" in lines[i]
    assert lines[i + 1].strip() == 'fix: pip install "numpy>=1.24"'
    assert "1 required check failed: numpy>=1.24" in result.stdout


def test_failures_are_reported_without_crashing(tmp_path):
    """No torch, no nvcc, a compiler that fails, no dataset: every problem gets its own line."""
    fake_cc = tmp_path / "fake-cc"
    fake_cc.write_text("#!/bin/sh\necho 'fake-cc: error: cannot create shared objects' >&2\nexit 1\n",
                       encoding="utf-8")
    fake_cc.chmod(0o755)
    empty = tmp_path / "data"
    empty.mkdir()
    result = run("--json", "--data-dir", str(empty),
                 TT_VERIFY_SIMULATE_MISSING="torch,nvcc", TT_VERIFY_CC=str(fake_cc))
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False
    checks = by_name(document)
    assert checks["torch"]["status"] == "fail" and "cannot import torch" in checks["torch"]["detail"]
    assert checks["device"]["status"] == "warn"
    nvcc = checks["nvcc (optional)"]
    assert nvcc["status"] == "warn" and not nvcc["required"]  # optional: never a failure
    cc = checks["C compiler + cffi"]
    assert cc["status"] == "fail" and cc["required"]
    assert "could not build a shared library: fake-cc: error: cannot create shared objects" in (
        cc["detail"])
    assert "-shared -fPIC" in cc["fix"]
    data = checks["Tiny Shakespeare"]
    assert data["status"] == "fail" and "is missing" in data["detail"]
    assert "bash data/download_shakespeare.sh" in data["fix"] and "--source" in data["fix"]
    assert checks["numpy>=1.24"]["status"] == "ok"  # only what is broken is reported broken


def test_corrupt_dataset_missing_compiler_and_an_ascii_console(tmp_path):
    (tmp_path / "tiny_shakespeare.txt").write_text("not shakespeare", encoding="utf-8")
    result = run("--data-dir", str(tmp_path), "--cc", str(tmp_path / "no-such-cc"),
                 PYTHONIOENCODING="ascii", TT_VERIFY_SIMULATE_MISSING="torch")
    assert result.returncode == 1
    # A console that cannot show the check marks gets ASCII ones instead of a UnicodeEncodeError.
    assert "  XX Tiny Shakespeare" in result.stdout and "has 15 bytes" in result.stdout
    assert "download_shakespeare.sh --force" in result.stdout
    assert "  XX C compiler + cffi" in result.stdout and "cannot run" in result.stdout


def test_version_specifiers():
    assert verify.satisfies("0.11.0", ">=0.11,<0.12")
    assert not verify.satisfies("0.12.0", ">=0.11,<0.12")  # nbval's upper bound
    assert not verify.satisfies("0.10.9", ">=0.11,<0.12")
    assert verify.satisfies("2.13.0+cpu", ">=2.2")
    assert verify.satisfies("2.2", ">=2.2.0")
    assert not verify.satisfies("4.0.0rc1", ">=4.0")  # a pre-release is below the release
    assert verify.satisfies("1.4.5", "~=1.4") and not verify.satisfies("2.0", "~=1.4")
    assert verify.satisfies("1.4.5", "~=1.4.2") and not verify.satisfies("1.5.0", "~=1.4.2")
    assert verify.satisfies("3.7.1", "==3.7.*") and verify.satisfies("3.8", "!=3.7.*")
    assert verify.satisfies("1.0", "")
    with pytest.raises(ValueError, match="cannot read version specifier"):
        verify.satisfies("1.0", "=>1.0")


def test_parse_requirements(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text(
        "# comment line\n\ntorch>=2.2   # every module\nnbval >= 0.11, <0.12\n"
        "-r other.txt\nuvicorn[standard]>=0.20; python_version >= '3.8'\nrich\n",
        encoding="utf-8",
    )
    assert verify.parse_requirements(path) == [
        ("torch", ">=2.2"), ("nbval", ">=0.11,<0.12"), ("uvicorn", ">=0.20"), ("rich", ""),
    ]
    names = [name for name, _ in verify.parse_requirements(repo_root() / "requirements.txt")]
    assert {"torch", "numpy", "cffi", "nbval"} <= set(names)


def test_constants_match_the_download_module():
    assert verify.SHAKESPEARE_BYTES == download.SHAKESPEARE_BYTES
    assert verify.SHAKESPEARE_SHA256 == download.SHAKESPEARE_SHA256
    assert verify.SHAKESPEARE_FILENAME == download.SHAKESPEARE_FILENAME


def test_device_descriptions_for_cuda_mps_and_a_broken_driver():
    """The GPU branches, with stand-in torch objects (this machine may have no GPU)."""
    from types import SimpleNamespace as NS

    def fake_torch(cuda=False, mps=False, count=1, fail=False):
        def name(i):
            if fail:
                raise RuntimeError("CUDA driver version is insufficient")
            return "Tesla T4"

        return NS(
            cuda=NS(is_available=lambda: cuda, device_count=lambda: count,
                    get_device_name=name, get_device_capability=lambda i: (7, 5)),
            backends=NS(mps=NS(is_available=lambda: mps)),
        )

    check = verify.check_device(fake_torch(cuda=True))
    assert (check.status, check.detail) == ("ok", "CUDA: Tesla T4 (compute capability 7.5)")
    assert verify.check_device(fake_torch(cuda=True, count=2)).detail.endswith(", 2 GPUs")
    assert verify.check_device(fake_torch(mps=True)).detail == "Apple GPU (MPS)"
    assert verify.check_device(fake_torch()).detail.startswith("CPU (no CUDA or MPS GPU found)")
    broken = verify.check_device(fake_torch(cuda=True, fail=True))
    assert broken.status == "warn" and "driver version is insufficient" in broken.detail
    assert verify.check_device(None).status == "warn"


def test_torch_build_and_version_bound(monkeypatch):
    from types import SimpleNamespace as NS

    def with_torch(version, cuda=None, hip=None):
        fake = NS(__version__=version, version=NS(cuda=cuda, hip=hip))
        monkeypatch.setattr(verify, "import_module", lambda name: fake)

    with_torch("2.5.1+cu121", cuda="12.1")
    check, _ = verify.check_torch("2.2")
    assert (check.status, check.detail) == ("ok", "2.5.1+cu121, CUDA 12.1 build")
    with_torch("2.4.0+rocm6.1", hip="6.1.40091")
    assert verify.check_torch("2.2")[0].detail == "2.4.0+rocm6.1, ROCm 6.1.40091 build"
    with_torch("1.13.1")
    check, _ = verify.check_torch("2.2")
    assert check.status == "fail" and "older than 2.2" in check.detail
    assert 'pip install "torch>=2.2"' in check.fix
