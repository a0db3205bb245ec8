"""Call the C inference engine `native/run.c` from Python.

`run.c` is one C file that runs a Llama model exported with `tiny_transformer.export` (llama2.c's
`model.bin` + `tokenizer.bin`). It builds two ways:

* as a program: `cc -O3 -o native/build/run native/run.c -lm` (`build_binary()` does exactly that);
* as a shared library, compiled with `-DRUN_LIBRARY` (which hides `main`), that Python loads with
  cffi in "ABI mode": we declare the C functions (`ffi.cdef`) and open the library (`ffi.dlopen`).
  No Python headers and no extension modules are involved, only a C compiler.

The library's file name contains a hash of run.c, the compiler and the flags. A changed source
therefore gets a new file: `dlopen` caches libraries by path, so reusing the old name would keep
running the old code in a live Jupyter kernel.

    >>> with NativeEngine("model.bin", "tokenizer.bin") as engine:      # doctest: +SKIP
    ...     out = engine.generate("HAMLET:", steps=100, seed=42)
    ...     print(out.text, f"{out.tok_per_s:.0f} tok/s")
"""

from __future__ import annotations

import codecs
import hashlib
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiny_transformer.utils import repo_root

CACHE_ENV = "TINY_TRANSFORMER_CACHE"
DEFAULT_FLAGS: tuple[str, ...] = ("-O3",)
BOS_ID, EOS_ID = 1, 2
_ERR_LEN = 1024

# The C API of run.c as seen from Python (cffi parses these declarations; they must match run.c).
CDEF = """
typedef struct tt_engine tt_engine;
tt_engine *tt_open(const char *model_path, const char *tokenizer_path, char *err, int errlen);
void tt_close(tt_engine *e);
int tt_config(const tt_engine *e, int *out7);
int tt_forward_all(tt_engine *e, const int *tokens, int n, float *out_logits, char *err, int errlen);
int tt_encode(tt_engine *e, const char *text, int bos, int eos, int *out, int max_out,
              char *err, int errlen);
const char *tt_decode_piece(tt_engine *e, int prev_token, int token);
int tt_generate(tt_engine *e, const char *prompt, int steps, float temperature, float topp,
                unsigned long long seed, void (*on_piece)(const char *, void *), void *user,
                int *out_tokens, int max_out, double *tok_per_s, char *err, int errlen);
"""


class CompilerNotFoundError(RuntimeError):
    """No C compiler on this machine (or $CC points to a missing program)."""


# ----------------------------------------------------------------------------------------------
# Building


def run_c_path() -> Path:
    """The C source: `<repo>/native/run.c`."""
    return repo_root() / "native" / "run.c"


def cache_dir() -> Path:
    """Where compiled files go: $TINY_TRANSFORMER_CACHE, else `<repo>/native/build` (git-ignored)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else repo_root() / "native" / "build"


def find_compiler() -> list[str]:
    """The C compiler command: $CC if set, else the first of cc, gcc, clang on the PATH."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        command = shlex.split(cc)
        if shutil.which(command[0]) is None:
            raise CompilerNotFoundError(
                f"CC={cc!r} is set but {command[0]!r} was not found; point CC to an installed C "
                "compiler (e.g. CC=gcc) or unset it"
            )
        return command
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise CompilerNotFoundError(
        "no C compiler found (tried $CC, cc, gcc, clang). Install one: on Debian/Ubuntu "
        "`sudo apt-get install build-essential`, on Fedora `sudo dnf install gcc`, on macOS "
        "`xcode-select --install` (Xcode Command Line Tools), on Windows use WSL; Colab already "
        "has gcc"
    )


def _library_suffix() -> str:
    if sys.platform == "darwin":
        return ".dylib"
    if sys.platform == "win32":
        return ".dll"
    return ".so"


def _build_key(source: Path, compiler: list[str], args: list[str]) -> str:
    """A short hash of everything that changes the compiled output."""
    h = hashlib.sha256()
    h.update(source.read_bytes())
    h.update("\0".join([*compiler, *args, sys.platform]).encode("utf-8"))
    return h.hexdigest()[:16]


def _check_source(source) -> Path:
    source = Path(source) if source is not None else run_c_path()
    if not source.is_file():
        raise FileNotFoundError(
            f"C source {source} not found; run from a full checkout of the repository (the "
            "native/ folder holds run.c)"
        )
    return source


def _compile(compiler: list[str], args: list[str], target: Path) -> None:
    """Compile into a temporary name, then rename: another process never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    command = [*compiler, *[str(tmp) if a == "{out}" else a for a in args]]
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise CompilerNotFoundError(f"could not run the C compiler {compiler[0]!r}: {exc}") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"compiling failed (exit code {proc.returncode}).\ncommand: {shlex.join(command)}\n"
            f"{(proc.stderr or proc.stdout).strip()}\nfix the error above in the C source, or the "
            "flags you passed"
        )
    os.replace(tmp, target)


def build_native(
    flags: tuple[str, ...] | list[str] = DEFAULT_FLAGS,
    force: bool = False,
    *,
    source=None,
    out_dir=None,
) -> Path:
    """Compile run.c into a shared library (once per source/flags) and return its path.

    The file is `<cache_dir>/librun-<hash>.so` where the hash covers run.c, the compiler and the
    flags; an existing file with that name is reused unless `force=True`.
    """
    source = _check_source(source)
    compiler = find_compiler()
    shared = ["-shared"] if sys.platform == "win32" else ["-shared", "-fPIC"]
    args = [*flags, *shared, "-DRUN_LIBRARY", "-o", "{out}", str(source.resolve()), "-lm"]
    key = _build_key(source, compiler, args)
    target = Path(out_dir) if out_dir is not None else cache_dir()
    target = target / f"librun-{key}{_library_suffix()}"
    if force or not target.is_file():
        _compile(compiler, args, target)
    return target


def build_binary(
    flags: tuple[str, ...] | list[str] = DEFAULT_FLAGS,
    force: bool = False,
    *,
    source=None,
    out_dir=None,
) -> Path:
    """Compile the standalone program (`cc -O3 -o native/build/run native/run.c -lm`).

    It is rebuilt only when run.c, the compiler or the flags changed (a `run.key` file beside it
    remembers the hash of the last build).
    """
    source = _check_source(source)
    compiler = find_compiler()
    args = [*flags, "-o", "{out}", str(source.resolve()), "-lm"]
    key = _build_key(source, compiler, args)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    binary = out_dir / ("run.exe" if sys.platform == "win32" else "run")
    stamp = out_dir / "run.key"
    fresh = binary.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == key
    if force or not fresh:
        _compile(compiler, args, binary)
        stamp.write_text(key, encoding="utf-8")
    return binary


_FFI = None
_LIBRARIES: dict[str, object] = {}
_LOAD_LOCK = threading.Lock()


def get_ffi():
    """The shared `cffi.FFI` object holding run.c's declarations."""
    global _FFI
    if _FFI is None:
        try:
            import cffi
        except ImportError:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "the 'cffi' package is not installed; install it with `pip install cffi` "
                "(or `pip install -e .[native]`)"
            ) from None
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        _FFI = ffi
    return _FFI


def load_library(flags: tuple[str, ...] | list[str] = DEFAULT_FLAGS, *, path=None):
    """Build (if needed) and `dlopen` the library; returns the cffi library object.

    Each path is opened once per process. Pass `path` to open a library built elsewhere.
    """
    ffi = get_ffi()
    lib_path = Path(path) if path is not None else build_native(flags)
    key = str(lib_path.resolve())
    with _LOAD_LOCK:
        if key not in _LIBRARIES:
            try:
                _LIBRARIES[key] = ffi.dlopen(key)
            except OSError as exc:
                raise RuntimeError(
                    f"could not load the compiled library {lib_path}: {exc}; delete it and call "
                    "build_native(force=True)"
                ) from None
        return _LIBRARIES[key]


# ----------------------------------------------------------------------------------------------
# The engine


@dataclass(frozen=True)
class NativeConfig:
    """The model's shape as run.c read it from model.bin."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int


@dataclass
class NativeGeneration:
    """The result of `NativeEngine.generate`.

    `text` and `tokens` are the continuation only (what the model wrote after the prompt);
    `full_text` puts the prompt in front. `tok_per_s` is run.c's own measurement: positions
    processed per second, prompt included, as llama2.c reports it.
    """

    prompt: str
    text: str
    tokens: list[int]
    tok_per_s: float
    seconds: float = 0.0

    @property
    def full_text(self) -> str:
        return self.prompt + self.text


class NativeStream:
    """Iterator over the text pieces of a generation, produced while run.c is still running.

    After the loop, `.result` holds the `NativeGeneration` (text, tokens, tok/s).
    """

    def __init__(self, start: Callable[[Callable[[str], None]], NativeGeneration]):
        self.result: NativeGeneration | None = None
        self._queue: queue.Queue = queue.Queue()
        self._done = object()
        self._error: BaseException | None = None
        self._consumed = False

        def work():
            try:
                self.result = start(self._queue.put)
            except BaseException as exc:  # handed to the consumer thread below
                self._error = exc
            finally:
                self._queue.put(self._done)

        self._thread = threading.Thread(target=work, name="run.c generate", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        if self._consumed:  # a second loop has nothing left to yield (and must not wait forever)
            return
        self._consumed = True
        try:
            while True:
                item = self._queue.get()
                if item is self._done:
                    break
                yield item
        finally:
            # Leaving the loop early still waits for run.c to finish: the engine is single-threaded.
            self._thread.join()
        if self._error is not None:
            raise self._error


class NativeEngine:
    """A model (and optionally its tokenizer) opened by run.c.

    Args:
        model_path: llama2.c `model.bin` (from `tiny_transformer.export.export_llama2c`).
        tokenizer_path: `tokenizer.bin` (from `sentencepiece_tools.export_tokenizer_bin`); needed for
            `encode`, `decode` and `generate`, not for `forward_logits`.
        flags: C compiler flags for the library (compiled once per distinct value).
        library: path of an already built library, instead of building one.

    Use it as a context manager, or call `close()`, to free the C memory.
    """

    def __init__(self, model_path, tokenizer_path=None, *, flags=DEFAULT_FLAGS, library=None):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(
                f"model file {model_path} not found; export one with "
                "tiny_transformer.export.export_llama2c(model, path) or "
                "`python -m tiny_transformer export`"
            )
        if tokenizer_path is not None and not Path(tokenizer_path).is_file():
            raise FileNotFoundError(
                f"tokenizer file {tokenizer_path} not found; write one with "
                "sentencepiece_tools.export_tokenizer_bin(sp_model_path, out_path)"
            )
        self.ffi = get_ffi()
        self.lib = load_library(flags, path=library)
        self.model_path = model_path
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self._lock = threading.Lock()
        err = self.ffi.new("char[]", _ERR_LEN)
        tok = str(self.tokenizer_path).encode() if self.tokenizer_path is not None else self.ffi.NULL
        handle = self.lib.tt_open(str(model_path).encode(), tok, err, _ERR_LEN)
        if handle == self.ffi.NULL:
            raise ValueError(f"run.c could not open {model_path}: {self._message(err)}")
        self._engine = handle
        out = self.ffi.new("int[7]")
        if self.lib.tt_config(self._engine, out) != 0:
            self.close()
            raise RuntimeError("run.c could not report the model configuration")
        self.config = NativeConfig(*[int(v) for v in out])

    # lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the C engine (safe to call twice)."""
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            with self._lock:
                self.lib.tt_close(engine)

    def __enter__(self) -> NativeEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass

    def __repr__(self) -> str:
        return f"NativeEngine({str(self.model_path)!r}, config={self.config})"

    # helpers ------------------------------------------------------------------------------------
    def _message(self, err) -> str:
        return self.ffi.string(err).decode("utf-8", errors="replace") or "unknown error"

    def _handle(self):
        if self._engine is None:
            raise RuntimeError("this NativeEngine is closed; open a new one")
        return self._engine

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer_path is None:
            raise RuntimeError(
                f"{what} needs a tokenizer, but this engine was opened without one; pass "
                "tokenizer_path='tokenizer.bin' to NativeEngine"
            )

    def _check_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens.tolist() if hasattr(tokens, "tolist") else list(tokens))
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError("tokens must be a non-empty 1-D sequence of integer token ids")
        bad = np.flatnonzero((arr < 0) | (arr >= self.config.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"token id {int(arr[i])} at position {i} is outside the vocabulary "
                f"(0..{self.config.vocab_size - 1})"
            )
        return np.ascontiguousarray(arr, dtype=np.int32)

    # the API ------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """run.c's tokenization of `text` (BOS first by default, as generation uses it)."""
        self._need_tokenizer("encode")
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        data = text.encode("utf-8")
        if b"\0" in data:
            raise ValueError("text contains a NUL character, which C strings cannot hold; remove it")
        max_out = len(data) + 3  # at most one token per byte, plus dummy prefix, BOS and EOS
        out = self.ffi.new("int[]", max_out)
        err = self.ffi.new("char[]", _ERR_LEN)
        with self._lock:
            n = self.lib.tt_encode(self._handle(), data, int(bos), int(eos), out, max_out, err, _ERR_LEN)
        if n < 0:
            raise ValueError(f"run.c could not encode the text: {self._message(err)}")
        return [int(out[i]) for i in range(n)]

    def decode_piece(self, prev_token: int, token: int) -> bytes:
        """The bytes run.c prints for `token` after `prev_token` (byte tokens become raw bytes)."""
        self._need_tokenizer("decode_piece")
        self._check_tokens([prev_token, token])
        with self._lock:
            ptr = self.lib.tt_decode_piece(self._handle(), int(prev_token), int(token))
        return b"" if ptr == self.ffi.NULL else self.ffi.string(ptr)

    def decode(self, tokens) -> str:
        """Text of a token sequence, joined the way run.c prints it (BOS/EOS print nothing)."""
        ids = self._check_tokens(tokens).tolist() if len(tokens) else []
        out, prev = b"", BOS_ID
        for token in ids:
            if token not in (BOS_ID, EOS_ID):
                out += self.decode_piece(prev, token)
            prev = token
        return out.decode("utf-8", errors="replace")

    def forward_logits(self, tokens) -> np.ndarray:
        """Logits for every position of `tokens`: a float32 array of shape (len(tokens), vocab)."""
        ids = self._check_tokens(tokens)
        if len(ids) > self.config.seq_len:
            raise ValueError(
                f"{len(ids)} tokens do not fit the model's context of {self.config.seq_len}; "
                "pass at most seq_len tokens"
            )
        logits = np.empty((len(ids), self.config.vocab_size), dtype=np.float32)
        err = self.ffi.new("char[]", _ERR_LEN)
        with self._lock:
            rc = self.lib.tt_forward_all(
                self._handle(), self.ffi.from_buffer("int[]", ids), len(ids),
                self.ffi.from_buffer("float[]", logits), err, _ERR_LEN,
            )
        if rc != 0:
            raise RuntimeError(f"run.c forward pass failed: {self._message(err)}")
        return logits

    def generate(
        self,
        prompt: str = "",
        steps: int = 256,
        temperature: float = 0.8,
        top_p: float = 0.9,
        seed: int | None = None,
        stream: bool | Callable[[str], object] = False,
    ):
        """Continue `prompt` with run.c's sampler (temperature 0 = greedy; top_p 1 = no nucleus cut).

        `steps` counts positions including the prompt and its BOS, as llama2.c's `-n` does (capped
        at the model's context); generation also stops when the model emits BOS or EOS. `seed=None`
        draws a fresh seed (0 asks run.c to seed from the clock). Returns a `NativeGeneration`;
        `stream=True` returns a `NativeStream` that yields the new text piece by piece while run.c
        produces it, and `stream=callback` calls `callback(piece)` for each piece.
        """
        self._need_tokenizer("generate")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if "\0" in prompt:
            raise ValueError("prompt contains a NUL character, which C strings cannot hold; remove it")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") or 1
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")

        def run(emit: Callable[[str], object] | None) -> NativeGeneration:
            return self._generate(prompt, steps, temperature, top_p, int(seed), emit)

        if stream is True:
            return NativeStream(run)
        if callable(stream):
            return run(stream)
        if stream is not False:
            raise TypeError("stream must be False, True or a callable taking one str")
        return run(None)

    def _generate(self, prompt, steps, temperature, top_p, seed, emit) -> NativeGeneration:
        ffi = self.ffi
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chunks: list[str] = []
        failure: list[BaseException] = []

        # Pieces may end inside a multi-byte character (byte-fallback tokens are single bytes):
        # decode incrementally so streamed text equals the final text exactly.
        def take(text: str) -> None:
            if not text:
                return
            chunks.append(text)
            if emit is not None and not failure:
                try:
                    emit(text)
                except BaseException as exc:  # re-raised after run.c returns
                    failure.append(exc)

        @ffi.callback("void(const char *, void *)")
        def on_piece(piece, _user):
            take(decoder.decode(ffi.string(piece)))

        max_out = min(steps, self.config.seq_len) + len(prompt.encode("utf-8")) + 3
        out = ffi.new("int[]", max_out)
        rate = ffi.new("double *")
        err = ffi.new("char[]", _ERR_LEN)
        start = time.perf_counter()
        with self._lock:
            n = self.lib.tt_generate(
                self._handle(), prompt.encode("utf-8"), steps, float(temperature), float(top_p),
                seed, on_piece, ffi.NULL, out, max_out, rate, err, _ERR_LEN,
            )
        seconds = time.perf_counter() - start
        take(decoder.decode(b"", final=True))
        if n < 0:
            raise RuntimeError(f"run.c generation failed: {self._message(err)}")
        if failure:
            raise failure[0]
        return NativeGeneration(
            prompt=prompt, text="".join(chunks), tokens=[int(out[i]) for i in range(n)],
            tok_per_s=float(rate[0]), seconds=seconds,
        )


def run_binary(
    model_path,
    tokenizer_path,
    prompt: str = "",
    steps: int = 256,
    temperature: float = 0.8,
    top_p: float = 0.9,
    seed: int = 42,
    *,
    binary=None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run the standalone `run` program (built on demand) the way you would in a terminal.

    Equivalent to `native/build/run model.bin -z tokenizer.bin -i PROMPT -n STEPS -t T -p P -s SEED`.
    Returns the finished process (`.stdout` holds the text, `.stderr` the tok/s report).
    """
    binary = Path(binary) if binary is not None else build_binary()
    command = [
        str(binary), str(model_path), "-z", str(tokenizer_path), "-n", str(steps),
        "-t", str(temperature), "-p", str(top_p), "-s", str(seed), "-i", prompt,
    ]
    proc = subprocess.run(command, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed (exit code {proc.returncode}):\n"
            f"{proc.stderr.decode('utf-8', errors='replace').strip()}"
        )
    return proc


__all__ = [
    "CDEF", "CompilerNotFoundError", "NativeConfig", "NativeEngine", "NativeGeneration",
    "NativeStream", "build_binary", "build_native", "cache_dir", "find_compiler", "get_ffi",
    "load_library", "run_binary", "run_c_path",
]
