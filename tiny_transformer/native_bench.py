"""How fast is the C engine, and how close to what the machine can do? (`bench native`)

    python -m tiny_transformer bench native            # ~15 s: two model sizes, fp32, Q8_0 and Q4_0

The benchmark compiles `native/run.c` with the best portable flags (`-O3 -march=native` when the
compiler accepts it), writes two Llama models with random weights (the 870K model of the C-inference
capstone: dim 128, 4 layers, vocab 512, context 256; and a 6.1M one: dim 288, 6 layers) and lets the
command-line program generate the full 256 positions, greedily, on one thread.

To judge the speed it also measures, with the same flags, this core's fp32 multiply-add peak and
how fast one core streams memory (`native/bench/peak.c`), and the speed of run.c's matrix-vector
kernels alone on matrices that stay in cache (`native/bench/kernels.c`). Generating one token reads every weight
once and does one multiply-add per weight, so

    FLOPs per token = 2 x (weights used per token) + 4 x dim x (pos + 1) per layer (attention)

and the weights must come through the memory system once per token, and with them the keys and
values of all earlier positions (2 x n_layers x kv_dim x (pos + 1) floats, averaged over the 256
positions). When these do not fit in the core's cache, memory bandwidth, not arithmetic, limits the
speed: "bound tok/s" is the read speed measured for a buffer as large as weights plus KV cache,
divided by the bytes per token, the speed if arithmetic were free. The table shows both bounds.

Q8_0 files hold int8 weights (1 byte plus a 4-byte scale per group of 32: 1.125 bytes per weight
instead of 4), Q4_0 files 4-bit ones (0.625 bytes per weight), and run.c multiplies them by int8
activations: it quantizes the input of every matrix-vector product and sums products of bytes in
int32 (native/README.md, "Q8_0"). With AVX-512 VNNI one instruction does 64 such multiply-adds where
an fp32 multiply-add instruction does 16.
The table still counts 2 FLOPs per multiply-add and compares with the fp32 peak: "% of peak" says
how much of the core's fp32 multiply-add capability the same work would take, and a Q8_0 kernel in
cache can go past 100 %.
Times are processor time (CPU seconds) so other programs on a shared machine distort them less;
wall-clock tok/s, what run.c prints, is listed beside them. The generated text goes to /dev/null:
run.c writes and flushes every token, and into a pipe read by Python each write also wakes the
reader, which cost ~10% of the 6.1M model's processor time on the build machine.

`compile_c` (used by the tests too) builds a C program once per source, compiler and flags, into
`native/build/` (or $TINY_TRANSFORMER_CACHE) under a name that contains a hash of all three.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from tiny_transformer.utils import repo_root

CACHE_ENV = "TINY_TRANSFORMER_CACHE"

BENCH_CONFIGS = {
    "870K": dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=352, max_seq_len=256),
    "6.1M": dict(vocab_size=512, dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, max_seq_len=256),
}
TARGET_PERCENT = {"870K": 30.0, "6.1M": 25.0}  # share of the fp32 peak we aim for


# ----------------------------------------------------------------------------------------------
# Compiling


def native_dir() -> Path:
    return repo_root() / "native"


def cache_dir() -> Path:
    """$TINY_TRANSFORMER_CACHE, else `<repo>/native/build` (git-ignored)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else native_dir() / "build"


def find_cc() -> str:
    """The C compiler: $CC, else cc, gcc or clang on the PATH."""
    for name in [os.environ.get("CC"), "cc", "gcc", "clang"]:
        if name and shutil.which(name.split()[0]):
            return name
    raise RuntimeError(
        "no C compiler found: install one (Debian/Ubuntu: sudo apt-get install build-essential; "
        "macOS: xcode-select --install) or point the CC environment variable at one"
    )


def compile_c(source, name: str, flags=("-O3",), *, depends=(), libs=("-lm",), timeout: int = 300) -> Path:
    """Compile one C file into an executable and return its path (cached).

    The file name holds a hash of the source (and of `depends`, e.g. files it #includes), the
    compiler and the flags, so a changed input gets a new file and an unchanged one is reused.
    Raises RuntimeError with the compiler's message when compilation fails.
    """
    cc = find_cc()
    source = Path(source)
    h = hashlib.sha256()
    for path in [source, *map(Path, depends)]:
        h.update(path.read_bytes())
    h.update(" ".join([cc, *flags, *libs]).encode("utf-8"))
    out = cache_dir() / f"{name}-{h.hexdigest()[:16]}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    os.close(fd)
    cmd = [*cc.split(), *flags, "-o", tmp, str(source), *libs]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"compiling {source.name} failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-3000:]}\n"
                "check that the compiler works (a C11 compiler with libm is needed) or set CC to another one"
            )
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def best_flags() -> list[str]:
    """-O3 -march=native if the compiler accepts it here, else plain -O3 (still vectorised)."""
    cc = find_cc()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("int main(void) { return 0; }\n", encoding="utf-8")
        proc = subprocess.run([*cc.split(), "-O3", "-march=native", "-o", str(Path(tmp) / "probe"), str(src)],
                              capture_output=True, timeout=120)
    return ["-O3", "-march=native"] if proc.returncode == 0 else ["-O3"]


def build_run(flags=None) -> Path:
    """The standalone `run` program built with `flags` (default: best_flags())."""
    flags = list(flags) if flags is not None else best_flags()
    return compile_c(native_dir() / "run.c", "run", ["-Wall", *flags])


# ----------------------------------------------------------------------------------------------
# Inputs


def write_plain_tokenizer(path, vocab_size: int) -> Path:
    """A valid tokenizer.bin for `vocab_size` ids: <unk>, BOS, EOS, the 256 byte pieces, a space,
    then placeholder pieces "t260", "t261", ... (benchmarks and tests need one; its text is
    meaningless)."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)] + [b" "]
    pieces = pieces[:vocab_size] + [f"t{i}".encode() for i in range(len(pieces), vocab_size)]
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", -float(i), len(p)))
            f.write(p)
    return path


def bench_model(name: str, seed: int = 0):
    """A LlamaLM of one of BENCH_CONFIGS with random weights. The embedding rows of BOS and EOS are
    zero, so their logits are exactly 0 and greedy decoding (which picks a positive logit) never
    ends the text early: every run generates all 256 positions."""
    import torch

    from tiny_transformer.model import LlamaConfig, LlamaLM

    torch.manual_seed(seed)
    model = LlamaLM(LlamaConfig(**BENCH_CONFIGS[name])).eval()
    with torch.no_grad():
        model.tok_embeddings.weight[1:3].zero_()
    return model


def weights_per_token(cfg: dict) -> int:
    """Weights read per generated token: all matrices of all layers plus the classifier (the
    embedding lookup reads one row only; norm weights are negligible)."""
    dim, hidden = cfg["dim"], cfg["hidden_dim"]
    kv_dim = dim // cfg["n_heads"] * cfg["n_kv_heads"]
    return cfg["n_layers"] * (2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim) + cfg["vocab_size"] * dim


def flops_per_token(cfg: dict, positions: int) -> float:
    """Average FLOPs per token over positions 0..positions-1 (formula in the module docstring)."""
    attention = sum(4 * cfg["dim"] * (pos + 1) for pos in range(positions)) * cfg["n_layers"] / positions
    return 2.0 * weights_per_token(cfg) + attention


# ----------------------------------------------------------------------------------------------
# Measuring


def measure_peak(flags, sizes=()) -> dict:
    """{"fma_gflops": x, "lanes": n, "read_gbps": {bytes: x}} for one core, built with `flags`."""
    exe = compile_c(native_dir() / "bench" / "peak.c", "peak", list(flags))
    proc = subprocess.run([str(exe), *map(str, sizes)], capture_output=True, text=True, timeout=300, check=True)
    out = {"read_gbps": {}}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts[0] == "fma_gflops":
            out["fma_gflops"] = float(parts[1])
        elif parts[0] == "vector_lanes":
            out["lanes"] = int(parts[1])
        elif parts[0] == "read_gbps":
            out["read_gbps"][int(parts[1])] = float(parts[2])
    return out


def kv_bytes_per_token(cfg: dict, positions: int) -> float:
    """Bytes of cached keys and values one token reads, averaged over positions 0..positions-1:
    at position pos every layer reads the fp32 keys and values of positions 0..pos."""
    kv_dim = cfg["dim"] // cfg["n_heads"] * cfg["n_kv_heads"]
    return cfg["n_layers"] * 2 * kv_dim * 4 * (positions + 1) / 2


def kv_cache_bytes(cfg: dict) -> int:
    """The whole KV cache: keys and values of every layer and position, fp32."""
    return cfg["n_layers"] * cfg["max_seq_len"] * cfg["dim"] // cfg["n_heads"] * cfg["n_kv_heads"] * 2 * 4


def layer_shapes(cfg: dict) -> list[tuple[int, int, int]]:
    """(columns n, rows d, how many) of the matrices one token multiplies with."""
    dim, hidden, L = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    kv_dim = dim // cfg["n_heads"] * cfg["n_kv_heads"]
    return [(dim, dim, 2 * L), (dim, kv_dim, 2 * L), (dim, hidden, 2 * L), (hidden, dim, L), (dim, cfg["vocab_size"], 1)]


def measure_kernels(flags, cfg: dict) -> dict:
    """GFLOP/s of run.c's fp32, Q8_0 and Q4_0 matrix-vector kernels on this model's matrix shapes, each
    matrix repeated so it stays in cache (`native/bench/kernels.c`); FLOP-weighted over the shapes."""
    exe = compile_c(native_dir() / "bench" / "kernels.c", "kernels", list(flags), depends=[native_dir() / "run.c"])
    shapes = layer_shapes(cfg)
    args = [str(v) for n, d, _ in shapes for v in (n, d)]
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, check=True)
    rates = {}
    for line in proc.stdout.splitlines():
        _, n, d, *speeds = line.split()
        rates[(int(n), int(d))] = tuple(map(float, speeds))
    out = {}
    for i, name in enumerate(("fp32", "q8_0", "q4_0")):
        flops = sum(2 * n * d * k for n, d, k in shapes)
        seconds = sum(2 * n * d * k / rates[(n, d)][i] for n, d, k in shapes)
        out[name] = flops / seconds
    return out


def time_generation(exe, model_path, tokenizer_path, steps: int = 256, repeats: int = 5) -> dict:
    """Run `run model -n steps -t 0 -v 1` `repeats` times; best wall and CPU tok/s, tokens made.
    The text (stdout) is discarded; the speeds and token ids come from stderr."""
    best_wall = best_cpu = 0.0
    generated = None
    for _ in range(repeats):
        proc = subprocess.run([str(exe), str(model_path), "-z", str(tokenizer_path), "-n", str(steps), "-t", "0",
                               "-v", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"run.c failed: {proc.stderr.strip()}")
        wall = float(re.search(r"achieved tok/s: ([0-9.]+)", proc.stderr).group(1))
        cpu = float(re.search(r"cpu tok/s: ([0-9.]+)", proc.stderr).group(1))
        generated = len(re.search(r"generated tokens:(.*)", proc.stderr).group(1).split())
        best_wall, best_cpu = max(best_wall, wall), max(best_cpu, cpu)
    return {"wall_tok_s": best_wall, "cpu_tok_s": best_cpu, "generated": generated}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_benchmark(models=("870K", "6.1M"), quantizations=(None, "q8_0", "q4_0"), repeats: int = 5, flags=None,
                  workdir=None, verbose: bool = True) -> list[dict]:
    """Measure every model x quantization; print a table (if verbose) and return its rows."""
    from tiny_transformer.export import export_llama2c

    flags = list(flags) if flags is not None else best_flags()
    exe = build_run(flags)
    say = print if verbose else (lambda *a, **k: None)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        tok = write_plain_tokenizer(tmp / "tokenizer.bin", 512)
        files = []
        for name in models:
            model = bench_model(name)
            for quant in quantizations:
                path = tmp / f"{name}-{quant or 'fp32'}.bin"
                header = export_llama2c(model, path, quantize=quant, group_size=32)
                files.append((name, quant, path, header))
        def working_set(name, header):  # weights plus the whole KV cache
            return header.file_size + kv_cache_bytes(BENCH_CONFIGS[name])

        sizes = sorted({working_set(name, h) for name, _, _, h in files})
        peak = measure_peak(flags, sizes)
        kernels = {name: measure_kernels(flags, BENCH_CONFIGS[name]) for name in models}
        say(f"native inference benchmark: one thread, run.c built with `{find_cc()} {' '.join(flags)}`")
        say(f"CPU: {cpu_name()}")
        say(f"fp32 multiply-add peak of one core (measured, 12 accumulators x {peak['lanes']} lanes): "
            f"{peak['fma_gflops']:.1f} GFLOP/s")
        say("FLOPs per token = 2 x weights used per token + 4 x dim x (pos + 1) per layer (attention), "
            "averaged over the 256 positions")
        say("bandwidth bound = (memory read speed for a buffer of the weights' and KV cache's size) / (weight "
            "bytes + KV-cache bytes read per token): the speed if arithmetic were free")
        say("kernel = run.c's matrix-vector products alone, on the model's matrix shapes kept in cache: "
            "the speed if memory were free")
        say("")
        header_line = (f"{'model':<6} {'weights':<6} {'MB':>6} {'MB/tok':>6} {'tok/s cpu':>10} {'tok/s wall':>10} "
                       f"{'GFLOP/s':>8} {'% peak':>7} {'read GB/s':>9} {'bound tok/s':>11} {'% bound':>7} "
                       f"{'kernel GFLOP/s':>14}")
        say(header_line)
        rows = []
        for name, quant, path, header in files:
            cfg = BENCH_CONFIGS[name]
            timing = time_generation(exe, path, tok, 256, repeats)
            flops = flops_per_token(cfg, 256)
            gflops = timing["cpu_tok_s"] * flops / 1e9
            # every weight is read once per token, and the cached keys and values of earlier positions
            bytes_per_token = header.file_size + kv_bytes_per_token(cfg, 256)
            read = peak["read_gbps"][working_set(name, header)]
            bound = read * 1e9 / bytes_per_token
            row = {
                "model": name, "weights": quant or "fp32", "file_mb": header.file_size / 1e6,
                "mb_per_token": bytes_per_token / 1e6,
                "params": weights_per_token(cfg), "flops_per_token": flops, **timing, "gflops": gflops,
                "percent_of_peak": 100.0 * gflops / peak["fma_gflops"], "read_gbps": read,
                "bandwidth_bound_tok_s": bound, "percent_of_bound": 100.0 * timing["cpu_tok_s"] / bound,
                "peak_gflops": peak["fma_gflops"], "flags": flags,
                "kernel_gflops": kernels[name][quant or "fp32"],
                "kernel_percent_of_peak": 100.0 * kernels[name][quant or "fp32"] / peak["fma_gflops"],
            }
            rows.append(row)
            say(f"{name:<6} {row['weights']:<6} {row['file_mb']:>6.2f} {row['mb_per_token']:>6.2f} {row['cpu_tok_s']:>10.0f} "
                f"{row['wall_tok_s']:>10.0f} {gflops:>8.1f} {row['percent_of_peak']:>6.1f}% {read:>9.1f} "
                f"{bound:>11.0f} {row['percent_of_bound']:>6.0f}% "
                f"{row['kernel_gflops']:>7.1f} ({row['kernel_percent_of_peak']:>4.1f}%)")
        say("")
        for name in models:
            if name not in TARGET_PERCENT:
                continue
            target = TARGET_PERCENT[name]
            mine = [r for r in rows if r["model"] == name]
            best = max(mine, key=lambda r: r["percent_of_peak"])
            verdict = "met" if best["percent_of_peak"] >= target else "not met"
            each = ", ".join(f"{r['weights']} {r['percent_of_peak']:.1f}% ({r['percent_of_bound']:.0f}% of its "
                             f"bandwidth bound)" for r in mine)
            say(f"target for {name}: >= {target:.0f}% of the fp32 peak end to end -> {each}: {verdict}")
        if any(r["generated"] != 255 for r in rows):
            say("note: a run stopped before 256 positions; its tok/s still counts the positions it ran")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=sorted(BENCH_CONFIGS), default=["870K", "6.1M"],
                        help="model sizes to run (default: both)")
    parser.add_argument("--weights", nargs="+", choices=["fp32", "q8_0", "q4_0"], default=["fp32", "q8_0", "q4_0"],
                        help="weight formats to run (default: all three)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per model; the best counts (default 5)")
    parser.add_argument("--flags", default=None,
                        help="compiler flags instead of the automatic choice, e.g. \"-O3\" for the portable build")


def main(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    flags = args.flags.split() if args.flags else None
    quants = [None if w == "fp32" else w for w in args.weights]
    run_benchmark(models=args.models, quantizations=quants, repeats=args.repeats, flags=flags)
    return 0
