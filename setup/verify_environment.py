#!/usr/bin/env python3
"""Check that this machine is ready for the tiny-transformer course, one line per check.

    python setup/verify_environment.py           # readable report; exit 0 when every required check passes
    python setup/verify_environment.py --json    # the same report as JSON on stdout (and nothing else)

Each line starts with a mark:
    ✓  fine
    ✗  a required check failed; the `fix:` line under it says what to do
    !  something optional is missing; the course works without it (those cells skip)

Paste the output when you report a problem: it says which Python, PyTorch build, device, compiler
and package versions you have.

The script needs only the standard library. Everything else is imported inside a try block, so a
missing or broken package shows up as a ✗ line instead of a crash.

For trying out the failure messages (the tests use these):
    TT_VERIFY_SIMULATE_MISSING=numpy,cffi   behave as if these packages (or tools: cc, nvcc) were absent
    TT_VERIFY_CC=/bin/false, or --cc PATH   use this program as the C compiler
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_PYTHON = (3, 11)
MIN_TORCH = "2.0"  # used only if requirements.txt has no torch line

# Tiny Shakespeare, as in tiny_transformer/download.py (a test keeps the two in sync). Repeated
# here because this script must run before anything is installed.
SHAKESPEARE_FILENAME = "tiny_shakespeare.txt"
SHAKESPEARE_BYTES = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# Colab brings its own notebook front end and is not where the test suite runs, so there these
# requirements are optional instead of required.
OPTIONAL_ON_COLAB = {"jupyterlab", "nbval", "pytest"}

SIMULATE_ENV = "TT_VERIFY_SIMULATE_MISSING"
CC_ENV = "TT_VERIFY_CC"
COMMAND_TIMEOUT_S = 60


@dataclass
class Check:
    """One line of the report. status is "ok", "fail" (✗) or "warn" (!, optional things only)."""

    name: str
    status: str
    required: bool
    detail: str
    fix: str = ""


# --------------------------------------------------------------------------------------------
# Small tools: simulated absence, versions, requirement specifiers


def simulated_missing() -> set[str]:
    """Names listed in $TT_VERIFY_SIMULATE_MISSING, normalised (lower case, '-' for '_')."""
    raw = os.environ.get(SIMULATE_ENV, "")
    return {normalize(name) for name in raw.split(",") if name.strip()}


def normalize(name: str) -> str:
    """Distribution names compare case-insensitively with '-', '_' and '.' all equal (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    if normalize(dist) in simulated_missing():
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_module(name: str):
    """Import a module, treating a simulated-missing one as not installed."""
    if normalize(name.split(".")[0]) in simulated_missing():
        raise ModuleNotFoundError(f"No module named {name!r} (simulated by {SIMULATE_ENV})")
    return importlib.import_module(name)


def version_key(version: str) -> tuple:
    """A sortable key: release numbers padded to 6, then 0 for pre-releases (rc, a, b, dev), 1 else.

    Enough of PEP 440 for requirement bounds: "2.13.0+cpu" -> (2, 13, 0, 0, 0, 0, 1),
    "4.0.0rc1" sorts below "4.0.0".
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)(.*)", version)
    if not match:
        return (0,) * 6 + (0,)
    release = [int(part) for part in match.group(1).split(".")][:6]
    rest = match.group(2).lower()
    pre = bool(re.match(r"[-_.]?(a|b|c|rc|alpha|beta|pre|preview|dev)\d*", rest))
    return tuple(release + [0] * (6 - len(release))) + (0 if pre else 1,)


def satisfies(version: str, specifier: str) -> bool:
    """Whether `version` meets a specifier such as ">=0.11,<0.12" (operators >= > <= < == != ~=)."""
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = re.match(r"(~=|==|!=|>=|<=|>|<)\s*(\S+)$", clause)
        if not match:
            raise ValueError(f"cannot read version specifier {clause!r}")
        op, bound = match.groups()
        if op in ("==", "!=") and bound.endswith(".*"):
            prefix = bound[:-2].split(".")
            equal = version.split("+")[0].split(".")[: len(prefix)] == prefix
            ok = equal if op == "==" else not equal
        else:
            have, want = version_key(version), version_key(bound)
            if op == "~=":
                parts = bound.split(".")
                upper = ".".join(parts[:-2] + [str(int(parts[-2]) + 1)]) if len(parts) > 1 else bound
                ok = want <= have < version_key(upper)
            else:
                ok = {
                    ">=": have >= want, ">": have > want, "<=": have <= want, "<": have < want,
                    "==": have == want, "!=": have != want,
                }[op]
        if not ok:
            return False
    return True


def parse_requirements(path: Path) -> list[tuple[str, str]]:
    """(name, specifier) for each requirement line; comments, blank lines and pip options skipped."""
    requirements = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = re.split(r"(^|\s)#", line, maxsplit=1)[0].strip()
            if not line or line.startswith("-"):
                continue
            line = line.split(";", 1)[0].strip()  # environment markers are not evaluated here
            match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$", line)
            if match:
                requirements.append((match.group(1), match.group(3).replace(" ", "")))
    return requirements


def on_colab() -> bool:
    """True inside Google Colab (the google.colab package only exists there)."""
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def run_command(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )


# --------------------------------------------------------------------------------------------
# The checks


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    detail = f"{version} ({sys.executable})"
    if sys.version_info[:2] >= MIN_PYTHON:
        return Check("Python", "ok", True, detail)
    need = ".".join(map(str, MIN_PYTHON))
    return Check(
        "Python", "fail", True, f"{detail} is older than {need}",
        f"install Python {need} or newer and create the virtual environment with it: "
        f"python{need} -m venv .venv",
    )


def check_torch(min_version: str):
    """Import torch and describe its build. Returns (Check, torch module or None)."""
    fix = (
        f'pip install "torch>={min_version}" (CPU-only wheel: pip install torch '
        "--index-url https://download.pytorch.org/whl/cpu)"
    )
    try:
        torch = import_module("torch")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return Check("torch", "fail", True, f"cannot import torch ({exc})", fix), None
    version = str(torch.__version__)
    cuda = getattr(torch.version, "cuda", None)
    hip = getattr(torch.version, "hip", None)
    build = f"CUDA {cuda} build" if cuda else f"ROCm {hip} build" if hip else "CPU-only build"
    detail = f"{version}, {build}"
    if not satisfies(version, f">={min_version}"):
        return Check("torch", "fail", True, f"{detail} is older than {min_version}", fix), torch
    return Check("torch", "ok", True, detail), torch


def check_device(torch) -> Check:
    if torch is None:
        return Check("device", "warn", False, "unknown: torch is not importable (see above)")
    try:
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            name = torch.cuda.get_device_name(0)
            major, minor = torch.cuda.get_device_capability(0)
            gpus = f", {count} GPUs" if count > 1 else ""
            return Check("device", "ok", False,
                         f"CUDA: {name} (compute capability {major}.{minor}){gpus}")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return Check("device", "ok", False, "Apple GPU (MPS)")
    except Exception as exc:  # a broken driver must not stop the report
        return Check("device", "warn", False, f"GPU query failed ({exc}); using the CPU",
                     "check the GPU driver (nvidia-smi) if you expected a GPU")
    return Check("device", "ok", False,
                 "CPU (no CUDA or MPS GPU found): every notebook runs, training is slower, "
                 "GPU-only cells skip")


def check_requirements(path: Path) -> list[Check]:
    if not path.is_file():
        return [Check("requirements.txt", "fail", True, f"{path} not found",
                      "run this script from a complete checkout, or pass --requirements PATH")]
    try:
        requirements = parse_requirements(path)
    except (OSError, UnicodeDecodeError) as exc:
        return [Check("requirements.txt", "fail", True, f"cannot read {path}: {exc}",
                      "restore the file from the repository (git checkout requirements.txt)")]
    colab = on_colab()
    checks = []
    for name, spec in requirements:
        required = not (colab and normalize(name) in OPTIONAL_ON_COLAB)
        bad = "fail" if required else "warn"
        label = f"{name}{spec}"
        fix = f'pip install "{name}{spec}"' if spec else f"pip install {name}"
        version = installed_version(name)
        if version is None:
            checks.append(Check(label, bad, required, "not installed", fix))
            continue
        try:
            ok = satisfies(version, spec)
        except ValueError as exc:
            checks.append(Check(label, bad, required, f"{version}; {exc}",
                                f"fix the line for {name} in {path.name}"))
            continue
        if ok:
            checks.append(Check(label, "ok", required, version))
        else:
            checks.append(Check(label, bad, required, f"{version} is installed, outside {spec}", fix))
    return checks


def find_compiler(explicit: str | None) -> list[str] | None:
    """The C compiler command: --cc, $TT_VERIFY_CC, $CC, then cc / gcc / clang on PATH."""
    for candidate in (explicit, os.environ.get(CC_ENV), os.environ.get("CC")):
        if candidate:
            return shlex.split(candidate)
    if "cc" in simulated_missing():
        return None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


C_SOURCE = "int tt_check_add(int a, int b) { return a + b; }\n"


def check_c_compiler(explicit_cc: str | None) -> Check:
    """Compile a tiny shared library and call it through cffi, as the C-inference module does."""
    name = "C compiler + cffi"
    if sys.platform == "win32":
        platform_fix = "on Windows use WSL2 (Ubuntu) and install build-essential there"
    elif sys.platform == "darwin":
        platform_fix = "install the command line tools: xcode-select --install"
    else:
        platform_fix = "install a compiler: sudo apt-get install build-essential (or gcc / clang)"
    try:
        cffi = import_module("cffi")
    except Exception as exc:
        return Check(name, "fail", True, f"cannot import cffi ({exc})", 'pip install "cffi>=1.15"')
    cc = find_compiler(explicit_cc)
    if cc is None:
        return Check(name, "fail", True, "no C compiler found (looked for $CC, cc, gcc, clang)",
                     platform_fix)
    shown = " ".join(cc)
    version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = run_command(cc + ["--version"])
        if out.returncode == 0 and out.stdout.strip():
            version = out.stdout.strip().splitlines()[0]
    with tempfile.TemporaryDirectory(prefix="tt-verify-") as tmp:
        source = Path(tmp) / "check.c"
        library = Path(tmp) / "libcheck.so"
        source.write_text(C_SOURCE, encoding="utf-8")
        try:
            result = run_command(cc + ["-shared", "-fPIC", "-O2", "-o", str(library), str(source)])
        except subprocess.TimeoutExpired:
            return Check(name, "fail", True, f"{shown} did not finish in {COMMAND_TIMEOUT_S} s",
                         f"check that {shown} works from a terminal, or {platform_fix}")
        except OSError as exc:
            return Check(name, "fail", True, f"cannot run {shown} ({exc})", platform_fix)
        if result.returncode != 0 or not library.exists():
            output = (result.stderr or result.stdout).strip().splitlines()
            why = output[-1] if output else f"exit status {result.returncode}"
            return Check(name, "fail", True, f"{shown} could not build a shared library: {why}",
                         f"make sure `{shown} -shared -fPIC` works, or {platform_fix}")
        try:
            ffi = cffi.FFI()
            ffi.cdef("int tt_check_add(int a, int b);")
            lib = ffi.dlopen(str(library))
            answer = lib.tt_check_add(40, 2)
        except Exception as exc:
            return Check(name, "fail", True, f"built the library but cffi could not call it ({exc})",
                         'reinstall cffi: pip install --force-reinstall "cffi>=1.15"')
    if answer != 42:
        return Check(name, "fail", True, f"the compiled function returned {answer}, expected 42",
                     f"the compiler {shown} produced wrong code; try another one (CC=gcc)")
    label = version or shown
    return Check(name, "ok", True, f"{label}; compiled and called C through cffi {cffi.__version__}")


def check_nvcc() -> Check:
    """nvcc is optional: only the CUDA training part compiles .cu files with it."""
    nvcc = None if "nvcc" in simulated_missing() else shutil.which("nvcc")
    if nvcc is None and "nvcc" not in simulated_missing():
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and (Path(home) / "bin" / "nvcc").is_file():
                nvcc = str(Path(home) / "bin" / "nvcc")
                break
    if nvcc is None:
        return Check("nvcc (optional)", "warn", False,
                     "not found: only the CUDA training part needs it; those cells skip",
                     "optional: install the CUDA Toolkit (Colab GPU runtimes have it)")
    try:
        out = run_command([nvcc, "--version"])
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("nvcc (optional)", "warn", False, f"{nvcc} does not run ({exc})",
                     "optional: reinstall the CUDA Toolkit")
    match = re.search(r"release ([\d.]+)", out.stdout)
    if out.returncode != 0 or not match:
        return Check("nvcc (optional)", "warn", False, f"{nvcc} --version failed",
                     "optional: reinstall the CUDA Toolkit")
    return Check("nvcc (optional)", "ok", False, f"CUDA {match.group(1)} ({nvcc})")


def check_dataset(data_dir: Path) -> Check:
    path = data_dir / SHAKESPEARE_FILENAME
    name = "Tiny Shakespeare"
    get = ("bash data/download_shakespeare.sh (offline: add --source /path/to/"
           "tiny_shakespeare.txt), or python -m tiny_transformer download")
    if not path.is_file():
        return Check(name, "fail", True, f"{path} is missing", get)
    size = path.stat().st_size
    if size != SHAKESPEARE_BYTES:
        return Check(name, "fail", True, f"{path} has {size:,} bytes, expected {SHAKESPEARE_BYTES:,}",
                     get.replace("download_shakespeare.sh", "download_shakespeare.sh --force", 1))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    if digest.hexdigest() != SHAKESPEARE_SHA256:
        return Check(name, "fail", True, f"{path} has the wrong sha256 (corrupted or edited)",
                     get.replace("download_shakespeare.sh", "download_shakespeare.sh --force", 1))
    return Check(name, "ok", True, f"{path} ({size:,} bytes, sha256 verified)")


def check_jupyter_kernel() -> Check:
    name = "Jupyter kernel"
    fix = "pip install ipykernel jupyter_client && python -m ipykernel install --user --name tiny-transformer"
    try:
        ipykernel = import_module("ipykernel")
        kernelspec = import_module("jupyter_client.kernelspec")
    except Exception as exc:
        return Check(name, "fail", True, f"cannot import the kernel machinery ({exc})", fix)
    try:
        specs = kernelspec.KernelSpecManager().find_kernel_specs()
    except Exception as exc:
        return Check(name, "fail", True, f"cannot list kernels ({exc})", fix)
    if not specs:
        return Check(name, "fail", True, "ipykernel is installed but no kernelspec was found", fix)
    return Check(name, "ok", True,
                 f"ipykernel {ipykernel.__version__}; kernels: {', '.join(sorted(specs))}")


def check_package_install() -> Check:
    """Optional: is `tiny_transformer` importable from anywhere (pip install -e .)?"""
    name = "tiny_transformer (optional)"
    fix = f"pip install -e {REPO}"
    here = str(REPO)
    # Look it up without this repository on sys.path, the way a script elsewhere would.
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != REPO]
    try:
        spec = importlib.util.find_spec("tiny_transformer")
    except (ImportError, ValueError):
        spec = None
    finally:
        sys.path[:] = saved
    if spec is None or not spec.submodule_search_locations:
        return Check(name, "warn", False,
                     "not installed: notebooks find it themselves; installing makes it importable "
                     "everywhere", fix)
    location = Path(next(iter(spec.submodule_search_locations))).resolve()
    if location.parent != REPO:
        return Check(name, "warn", False, f"imports another copy: {location}", fix)
    return Check(name, "ok", False, f"installed from {here}")


def torch_lower_bound(requirements_path: Path) -> str:
    try:
        for name, spec in parse_requirements(requirements_path):
            match = re.search(r">=\s*([\d.]+)", spec)
            if normalize(name) == "torch" and match:
                return match.group(1)
    except (OSError, UnicodeDecodeError):
        pass
    return MIN_TORCH


def run_checks(args: argparse.Namespace) -> list[Check]:
    checks = [check_python()]
    torch_check, torch = check_torch(torch_lower_bound(args.requirements))
    checks += [torch_check, check_device(torch)]
    checks += check_requirements(args.requirements)
    checks += [
        check_c_compiler(args.cc),
        check_nvcc(),
        check_dataset(args.data_dir),
        check_jupyter_kernel(),
        check_package_install(),
    ]
    return checks


# --------------------------------------------------------------------------------------------
# Output


def marks_for(stream) -> dict[str, str]:
    """✓ ✗ ! where the terminal can show them, plain ASCII otherwise (e.g. a cp1252 console)."""
    try:
        "✓✗".encode(stream.encoding or "ascii")
        return {"ok": "✓", "fail": "✗", "warn": "!"}
    except (UnicodeEncodeError, LookupError):
        return {"ok": "ok", "fail": "XX", "warn": "!!"}


def print_report(checks: list[Check], stream=sys.stdout) -> None:
    marks = marks_for(stream)
    machine = f"{platform.system()} {platform.machine()}".strip()
    print(f"tiny-transformer environment check ({machine}, Python {platform.python_version()})",
          file=stream)
    width = max(len(c.name) for c in checks) + 2
    for c in checks:
        print(f"  {marks[c.status]} {c.name:<{width}}{c.detail}", file=stream)
        if c.fix and c.status != "ok":
            print(f"      {'fix' if c.status == 'fail' else 'tip'}: {c.fix}", file=stream)
    failed = [c for c in checks if c.required and c.status == "fail"]
    if failed:
        print(f"\n{len(failed)} required check{'s' if len(failed) > 1 else ''} failed: "
              f"{', '.join(c.name for c in failed)}. Apply the fixes above and run this again.",
              file=stream)
    else:
        print("\nAll required checks passed.", file=stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check that this machine is ready for the tiny-transformer course.",
        epilog=f"Testing hooks: {SIMULATE_ENV}=numpy,cffi pretends packages are missing; "
        f"{CC_ENV}=PATH (or --cc) picks the C compiler.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    parser.add_argument("--cc", default=None, help="C compiler command to test (default: $CC or cc)")
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.txt",
                        help="requirements file to check against (default: the repository's)")
    default_data = Path(os.environ.get("TINY_TRANSFORMER_DATA") or REPO / "data")
    parser.add_argument("--data-dir", type=Path, default=default_data,
                        help="where tiny_shakespeare.txt should be "
                        "(default: $TINY_TRANSFORMER_DATA or <repo>/data)")
    args = parser.parse_args(argv)
    # A console that cannot show some character (a GPU name, a path) gets "?" instead of a crash.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")

    if args.json:
        # Keep stdout pure JSON even if an imported package prints something.
        with contextlib.redirect_stdout(sys.stderr):
            checks = run_checks(args)
    else:
        checks = run_checks(args)
    ok = not any(c.required and c.status == "fail" for c in checks)
    if args.json:
        document = {
            "ok": ok,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "checks": [asdict(c) for c in checks],
        }
        print(json.dumps(document, indent=2))
    else:
        print_report(checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
