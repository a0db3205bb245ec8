"""Fuzzing run.c under AddressSanitizer + UndefinedBehaviorSanitizer.

native/fuzz/fuzz.c mutates model files (llama2.c v0 and extended, fp32 and Q8_0), tokenizers,
prompts, generation settings and command lines, thousands of cases in one process. A sanitizer
report or a signal kills the run (non-zero status); an input that run.c rejects must come with an
error message. The seed is fixed, so a failure reproduces with `native/fuzz/run_fuzz.sh 6000 1234`.
It runs twice: built for any CPU (plain-C Q8_0 kernel) and, where the compiler accepts it, with
-march=native (this CPU's vector kernels, AVX-512 VNNI or AVX-VNNI for Q8_0 where it has them).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tiny_transformer.native_bench import best_flags, compile_c, find_cc, native_dir

CASES = 6000
SEED = 1234
SANITIZE = ["-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


@pytest.fixture(scope="module", params=["any-cpu", "native"])
def fuzzer(request):
    try:
        find_cc()
    except RuntimeError:
        pytest.skip("no C compiler on this machine")
    extra = []
    if request.param == "native":
        extra = [f for f in best_flags() if f.startswith("-march")]
        if not extra:
            pytest.skip("the compiler does not accept -march=native")
    try:
        return compile_c(native_dir() / "fuzz" / "fuzz.c", "fuzz-test", [*SANITIZE, *extra],
                         depends=[native_dir() / "run.c"])
    except RuntimeError as exc:
        if "sanitize" in str(exc) or "asan" in str(exc).lower():
            pytest.skip(f"this compiler cannot build with sanitizers: {str(exc)[-300:]}")
        raise


def run_fuzzer(exe, cases, seed, tmp_path):
    env = {**os.environ, "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1:allocator_may_return_null=1",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    return subprocess.run([str(exe), str(cases), str(seed)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)


def test_thousands_of_mutated_inputs_cause_no_crash(fuzzer, tmp_path):
    proc = run_fuzzer(fuzzer, CASES, SEED, tmp_path)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-4000:]
    assert "Sanitizer" not in report and "runtime error" not in report
    match = re.search(r"fuzz: (\d+) cases \((\d+) opened and exercised, (\d+) rejected with a message\), "
                      r"0 crashes, 0 failures without a message", proc.stdout)
    assert match, report[-2000:]
    cases, opened, rejected = map(int, match.groups())
    assert cases == CASES and opened + rejected == CASES
    # both paths are exercised: damaged files that are refused, and loadable ones that are run
    assert opened > CASES // 10 and rejected > CASES // 10
    assert not list(tmp_path.iterdir())  # its temporary file is cleaned up


def test_the_fuzzer_is_deterministic(fuzzer, tmp_path):
    first = run_fuzzer(fuzzer, 300, 99, tmp_path).stdout
    assert first and first == run_fuzzer(fuzzer, 300, 99, tmp_path).stdout
