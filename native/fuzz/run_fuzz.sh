#!/usr/bin/env bash
# Build the sanitizer fuzz driver and run it: run_fuzz.sh [CASES] [SEED]   (defaults 5000, 1)
# Exit status 0 means: every case ran, no sanitizer report, every rejection came with a message.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cases="${1:-5000}"
seed="${2:-1}"
make -s -C "$here" build/fuzz
# abort_on_error/halt_on_error: the first problem stops the run with a report and a non-zero status.
export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
cd "$here/build"
exec ./fuzz "$cases" "$seed"
