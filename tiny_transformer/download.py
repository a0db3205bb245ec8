"""Put the course's datasets on disk, verified: Tiny Shakespeare and the simple sequence tasks.

Tiny Shakespeare (40,000 lines from Shakespeare's plays, 1,115,394 bytes) is the corpus that the
training modules use. `ensure_shakespeare()` fetches it once, checks its exact size and SHA-256 and
writes it atomically, so `data/tiny_shakespeare.txt` is either the right file or absent, never half
a file. Offline? Point it at a local copy with `source=`, the `--source` flag or the environment
variable TINY_SHAKESPEARE_SOURCE.

`make_simple_sequences()` writes `data/simple_sequences.txt`: small synthetic tasks (copy, reverse,
sort, ...) whose answers a program can check, so the early modules can see attention solve
something before we train on real text.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tiny_transformer.utils import data_dir, fsync_directory

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_BYTES = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILENAME = "tiny_shakespeare.txt"
SOURCE_ENV = "TINY_SHAKESPEARE_SOURCE"
SIMPLE_SEQUENCES_FILENAME = "simple_sequences.txt"

# We never read more than the expected size plus this margin: a wrong URL (an HTML error page, a
# multi-gigabyte file) is refused after a bounded amount of work instead of filling the disk.
READ_MARGIN = 64 * 1024
_CHUNK = 64 * 1024
_USER_AGENT = "tiny-transformer-download/1"


class DownloadError(RuntimeError):
    """A dataset could not be fetched or did not verify. The message names the problem and the fix."""


class SourceNotFoundError(DownloadError, FileNotFoundError):
    """The local file given as the download source does not exist."""


class _Transient(Exception):
    """A network failure worth another attempt (connection refused, timeout, cut-off transfer)."""


# --------------------------------------------------------------------------------------------
# Verifying a file


@dataclass(frozen=True)
class FileCheck:
    """The result of `verify_file`: `ok`, what was measured, and the `problem` when not ok."""

    path: Path
    ok: bool
    size: int | None  # None when the file does not exist
    sha256: str | None  # None when it was not worth hashing (missing, or the size is already wrong)
    problem: str = ""

    def __bool__(self) -> bool:
        return self.ok


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file as 64 hex digits, read in chunks (constant memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(
    path: str | Path, expected_bytes: int | None = None, expected_sha256: str | None = None
) -> FileCheck:
    """Check that `path` is exactly the expected file (default: Tiny Shakespeare).

    The size is compared first because it is free; the SHA-256 then catches any changed byte.
    Returns a `FileCheck` (truthy when the file is valid) instead of raising, so callers can decide
    between "skip the download", "replace the file" and "report the problem".
    """
    # Read the module constants at call time, so tests can swap in a small fake file.
    expected_bytes = SHAKESPEARE_BYTES if expected_bytes is None else expected_bytes
    expected_sha256 = SHAKESPEARE_SHA256 if expected_sha256 is None else expected_sha256
    path = Path(path)
    if not path.exists():
        return FileCheck(path, False, None, None, "the file does not exist")
    if not path.is_file():
        return FileCheck(path, False, None, None, "the path is not a regular file")
    size = path.stat().st_size
    if size != expected_bytes:
        problem = f"it has {size:,} bytes, expected {expected_bytes:,}"
        return FileCheck(path, False, size, None, problem)
    sha = sha256_file(path)
    if sha != expected_sha256.lower():
        problem = f"its sha256 is {sha}, expected {expected_sha256.lower()}"
        return FileCheck(path, False, size, sha, problem)
    return FileCheck(path, True, size, sha)


# --------------------------------------------------------------------------------------------
# Fetching a file atomically


def _offline_help(what: str = "tiny_shakespeare.txt") -> str:
    """The lines every network error ends with: how to use a local copy instead."""
    return (
        "If this machine is offline (or the site is blocked), use a local copy of the file:\n"
        f"    python -m tiny_transformer download shakespeare --source /path/to/{what}\n"
        f"    bash data/download_shakespeare.sh --source /path/to/{what}\n"
        "or set the environment variable, which notebooks pick up too:\n"
        f"    export {SOURCE_ENV}=/path/to/{what}\n"
        "The source may also be a file:// or http(s):// URL (for example a mirror)."
    )


def _resolve_source(source: str | os.PathLike | None) -> tuple[str, str | Path]:
    """Turn a source into ("url", "http(s)://...") or ("file", Path). None means env var or URL."""
    if source is None:
        source = os.environ.get(SOURCE_ENV, "").strip() or SHAKESPEARE_URL
    if not isinstance(source, str):
        return "file", Path(source).expanduser()  # a Path is always a local file, never a URL
    text = source.strip()
    if not text:
        raise DownloadError(
            f"the download source is empty; pass a file path or URL, or unset {SOURCE_ENV}"
        )
    parsed = urllib.parse.urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return "url", text
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(
                f"cannot read {text!r}: file:// URLs must name a local file, "
                "e.g. file:///home/me/tiny_shakespeare.txt"
            )
        return "file", Path(urllib.request.url2pathname(parsed.path))
    # A one-letter "scheme" is a Windows drive letter (C:\...), i.e. a plain path.
    if len(scheme) > 1:
        raise DownloadError(
            f"unsupported source {text!r}: use a local path, a file:// URL or an http(s):// URL"
        )
    return "file", Path(text).expanduser()


def _copy_bounded(src, dst, limit: int, digest) -> int:
    """Copy a binary stream into `dst`, hashing as we go; refuse once more than `limit` bytes come."""
    total = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return total
        total += len(chunk)
        if total > limit:
            raise DownloadError(
                f"the source sent more than {limit:,} bytes, far more than the expected file; "
                "it is not the file we want (check the URL or path)"
            )
        digest.update(chunk)
        dst.write(chunk)


def _read_url_into(url: str, dst, limit: int, timeout: float, digest) -> int:
    """One attempt at streaming `url` into `dst`. Raises `_Transient` for errors worth retrying."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise DownloadError(
                    f"{url} announces {int(length):,} bytes, far more than the expected file; "
                    "it is not the file we want (check the URL)"
                )
            size = _copy_bounded(response, dst, limit, digest)
            # http.client does not complain when a connection drops before the announced length.
            if length is not None and length.isdigit() and size < int(length):
                raise _Transient(f"connection closed after {size:,} of {int(length):,} bytes")
            return size
    except urllib.error.HTTPError as exc:
        # 408/429/5xx are the server's passing trouble; any other status will not change on retry.
        if exc.code in (408, 429) or exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(
            f"{url} answered HTTP {exc.code} {exc.reason}; check the URL.\n" + _offline_help()
        ) from exc
    except urllib.error.URLError as exc:
        raise _Transient(str(exc.reason)) from exc
    except (http.client.HTTPException, ConnectionError, TimeoutError, OSError) as exc:
        # IncompleteRead (connection cut mid-file), resets and timeouts while reading the body.
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc


def _use_default_permissions(path: Path) -> None:
    """Temporary files are created private (0600); give the final file the usual rw-r--r-- mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fetch_verified(
    source: str | os.PathLike,
    dest: str | Path,
    *,
    expected_bytes: int,
    expected_sha256: str,
    timeout: float = 30.0,
    retries: int = 3,
    retry_delay: float = 1.0,
    log=print,
) -> Path:
    """Copy `source` (URL or local path) to `dest` if and only if it is exactly the expected file.

    The bytes go to a temporary file in the same folder, are fsynced and verified, and only then
    `os.replace` moves them to `dest` in one step. Whatever goes wrong (network, size, checksum,
    Ctrl-C) the temporary file is removed and an existing `dest` is left as it was.
    Network errors are retried `retries` times in all, waiting `retry_delay`, 2x, 3x... seconds.
    """
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    kind, where = _resolve_source(source)
    dest = Path(dest)
    limit = expected_bytes + READ_MARGIN
    if kind == "file":
        if not where.exists():
            raise SourceNotFoundError(
                f"the source file {where} does not exist; pass the path of a copy of "
                f"{dest.name} (--source PATH or {SOURCE_ENV}=PATH), or drop --source and unset "
                f"{SOURCE_ENV} to download it from {SHAKESPEARE_URL}"
            )
        if where.is_dir():
            raise DownloadError(
                f"the source {where} is a folder; pass the path of the file itself, "
                f"e.g. {where / SHAKESPEARE_FILENAME}"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{dest.name}.part-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if kind == "file":
                digest = hashlib.sha256()
                with open(where, "rb") as src:
                    size = _copy_bounded(src, out, limit, digest)
            else:
                for attempt in range(1, retries + 1):
                    out.seek(0)
                    out.truncate()
                    digest = hashlib.sha256()
                    try:
                        size = _read_url_into(where, out, limit, timeout, digest)
                        break
                    except _Transient as exc:
                        if attempt == retries:
                            raise DownloadError(
                                f"could not download {where}: {exc} "
                                f"(tried {retries} time{'s' if retries > 1 else ''}).\n"
                                + _offline_help(dest.name)
                            ) from exc
                        wait = retry_delay * attempt
                        log(f"download failed ({exc}); retrying in {wait:g} s "
                            f"[attempt {attempt + 1}/{retries}]")
                        time.sleep(wait)
            out.flush()
            os.fsync(out.fileno())
        _use_default_permissions(tmp)
        sha = digest.hexdigest()
        origin = str(where)
        if size != expected_bytes:
            raise DownloadError(
                f"{origin} gave {size:,} bytes, expected exactly {expected_bytes:,}: the file is "
                "truncated or a different file. Try again, or use an intact copy "
                f"(--source PATH or {SOURCE_ENV}=PATH)."
            )
        if sha != expected_sha256.lower():
            raise DownloadError(
                f"{origin} has the right size but the wrong sha256 ({sha}, expected "
                f"{expected_sha256.lower()}): the file is corrupted or modified. Use an intact "
                f"copy (--source PATH or {SOURCE_ENV}=PATH)."
            )
        if dest.is_dir():
            raise DownloadError(f"{dest} is a folder; pass a file path as the destination")
        os.replace(tmp, dest)
        fsync_directory(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def ensure_shakespeare(
    dest: str | Path | None = None,
    source: str | os.PathLike | None = None,
    force: bool = False,
    quiet: bool = False,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    retry_delay: float = 1.0,
) -> Path:
    """Make sure a verified Tiny Shakespeare is at `dest` and return its path.

    dest:   file path (or a folder) to write; default `<data dir>/tiny_shakespeare.txt`.
    source: where to get it: a local path, a file:// or http(s):// URL. Default: the environment
            variable TINY_SHAKESPEARE_SOURCE if set, else the canonical URL `SHAKESPEARE_URL`.
    force:  fetch again even if a valid copy is already there.
    quiet:  print nothing (errors are still raised).

    A valid existing copy is kept (no download, file untouched); an invalid one is replaced.
    Raises `DownloadError` (a RuntimeError) with the fix, e.g. how to work offline.
    """
    log = (lambda *a, **k: None) if quiet else print
    dest = Path(dest) if dest is not None else data_dir() / SHAKESPEARE_FILENAME
    if dest.is_dir():
        dest = dest / SHAKESPEARE_FILENAME
    _, where = _resolve_source(source)  # a malformed source is an error even if unused
    check = verify_file(dest, SHAKESPEARE_BYTES, SHAKESPEARE_SHA256)
    if check.ok and not force:
        unused = "" if source is None else "; source not used (force=True / --force fetches anyway)"
        log(f"{dest}: already present and verified "
            f"({check.size:,} bytes, sha256 {check.sha256[:16]}...){unused}")
    else:
        if dest.exists():
            reason = "fetching again (force)" if check.ok else f"invalid copy: {check.problem}"
            log(f"{dest}: replacing it ({reason})")
        log(f"fetching Tiny Shakespeare from {where}")
        fetch_verified(
            where, dest,
            expected_bytes=SHAKESPEARE_BYTES, expected_sha256=SHAKESPEARE_SHA256,
            timeout=timeout, retries=retries, retry_delay=retry_delay, log=log,
        )
        log(f"{dest}: written and verified ({SHAKESPEARE_BYTES:,} bytes, sha256 "
            f"{SHAKESPEARE_SHA256[:16]}...)")
    if not quiet:
        print(dataset_stats(dest).summary("Tiny Shakespeare"))
    return dest


# --------------------------------------------------------------------------------------------
# Statistics a learner looks at first


@dataclass(frozen=True)
class DatasetStats:
    """What a text corpus looks like at a glance."""

    path: Path
    bytes: int
    characters: int  # Unicode characters; equal to `bytes` for plain ASCII text
    lines: int  # a last line without a newline counts too
    words: int  # whitespace-separated pieces
    charset: str  # every distinct character, sorted
    counts: dict[str, int]  # character -> how often it occurs

    @property
    def unique_chars(self) -> int:
        """How many distinct characters: the vocabulary size of a character-level model."""
        return len(self.charset)

    def summary(self, title: str | None = None) -> str:
        """A few aligned lines to print; newlines and tabs in the character set are escaped."""
        shown = self.charset.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        return "\n".join([
            f"{title or self.path.name}: {self.path}",
            f"  size           {self.bytes:,} bytes",
            f"  characters     {self.characters:,}",
            f"  lines          {self.lines:,}",
            f"  words          {self.words:,}",
            f"  unique chars   {self.unique_chars}",
            f"  character set  {shown}",
        ])


def dataset_stats(path: str | Path) -> DatasetStats:
    """Size, characters, lines, words and the character set of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; for Tiny Shakespeare run "
            "`python -m tiny_transformer download shakespeare` first"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); "
            "pass a plain text file"
        ) from exc
    counts = Counter(text)
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return DatasetStats(
        path=path,
        bytes=len(raw),
        characters=len(text),
        lines=lines,
        words=len(text.split()),
        charset="".join(sorted(counts)),
        counts=dict(counts),
    )


# --------------------------------------------------------------------------------------------
# Simple sequence tasks
#
# File format (data/simple_sequences.txt), one example per line, UTF-8:
#
#     <task>: <prompt>|<answer>
#
#     copy: cfba|cfba          the prompt itself
#     reverse: cfba|abfc       the prompt backwards
#     sort: cfba|abcf          the prompt's characters in sorted order
#     count: cabca|a2b1c2      each distinct letter, alphabetically, followed by how often it occurs
#     add: 47+385|432          the sum of two decimal numbers (0-999)
#     parity: 10110|1          1 if the prompt has an odd number of 1s, else 0
#
# Letters come from "abcdefgh" and prompts are 3-8 characters long. A language model sees the
# whole line as text; everything up to and including "|" is the question, the rest the answer.

SIMPLE_TASKS = ("copy", "reverse", "sort", "count", "add", "parity")
SIMPLE_ALPHABET = "abcdefgh"


@dataclass(frozen=True)
class SequenceExample:
    """One line of `simple_sequences.txt`: `task: prompt|answer`."""

    task: str
    prompt: str
    answer: str

    def __str__(self) -> str:
        return f"{self.task}: {self.prompt}|{self.answer}"

    def is_correct(self) -> bool:
        """True when `answer` is what the task's rule gives for `prompt`."""
        return solve_simple_task(self.task, self.prompt) == self.answer


def solve_simple_task(task: str, prompt: str) -> str:
    """The correct answer for `prompt` under `task`'s rule (see the format comment above)."""
    if task == "copy":
        return prompt
    if task == "reverse":
        return prompt[::-1]
    if task == "sort":
        return "".join(sorted(prompt))
    if task == "count":
        counts = Counter(prompt)
        return "".join(f"{ch}{counts[ch]}" for ch in sorted(counts))
    if task == "add":
        left, plus, right = prompt.partition("+")
        if not plus or not left.isdigit() or not right.isdigit():
            raise ValueError(f"add expects a prompt like '47+385', got {prompt!r}")
        return str(int(left) + int(right))
    if task == "parity":
        if not prompt or set(prompt) - {"0", "1"}:
            raise ValueError(f"parity expects a prompt of 0s and 1s, got {prompt!r}")
        return str(prompt.count("1") % 2)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(SIMPLE_TASKS)}")


def _random_prompt(task: str, rng: random.Random, min_len: int, max_len: int) -> str:
    if task == "add":
        return f"{rng.randint(0, 999)}+{rng.randint(0, 999)}"
    length = rng.randint(min_len, max_len)
    symbols = "01" if task == "parity" else SIMPLE_ALPHABET
    return "".join(rng.choice(symbols) for _ in range(length))


def generate_simple_sequences(
    n_per_task: int = 200,
    seed: int = 0,
    tasks: tuple[str, ...] = SIMPLE_TASKS,
    min_len: int = 3,
    max_len: int = 8,
) -> list[SequenceExample]:
    """`n_per_task` examples of every task, shuffled; the same seed always gives the same list."""
    unknown = [t for t in tasks if t not in SIMPLE_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(SIMPLE_TASKS)}")
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be at least 1, got {n_per_task}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    rng = random.Random(seed)
    examples = []
    for task in tasks:
        for _ in range(n_per_task):
            prompt = _random_prompt(task, rng, min_len, max_len)
            examples.append(SequenceExample(task, prompt, solve_simple_task(task, prompt)))
    rng.shuffle(examples)
    return examples


def parse_simple_sequence(line: str, line_number: int | None = None) -> SequenceExample:
    """Parse one `task: prompt|answer` line (a trailing newline is fine) into a SequenceExample."""
    where = f"line {line_number}: " if line_number is not None else ""
    text = line.rstrip("\r\n")
    task, sep, rest = text.partition(": ")
    prompt, bar, answer = rest.partition("|")
    if not sep or not bar or "|" in answer:
        raise ValueError(f"{where}expected 'task: prompt|answer' (e.g. 'copy: abc|abc'), got {text!r}")
    if task not in SIMPLE_TASKS:
        raise ValueError(f"{where}unknown task {task!r}; expected one of {', '.join(SIMPLE_TASKS)}")
    return SequenceExample(task, prompt, answer)


def load_simple_sequences(path: str | Path | None = None) -> list[SequenceExample]:
    """Read every example of a simple-sequences file (default `<data dir>/simple_sequences.txt`)."""
    path = Path(path) if path is not None else data_dir() / SIMPLE_SEQUENCES_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; create it with `python -m tiny_transformer download simple` "
            "or tiny_transformer.download.make_simple_sequences()"
        )
    with open(path, encoding="utf-8") as f:
        return [parse_simple_sequence(line, i) for i, line in enumerate(f, 1) if line.strip()]


def make_simple_sequences(
    path: str | Path | None = None, n_per_task: int = 200, seed: int = 0, quiet: bool = False
) -> Path:
    """Write the simple sequence tasks to `path` (default `<data dir>/simple_sequences.txt`).

    Idempotent: the content depends only on `n_per_task` and `seed`, and a file that already holds
    exactly that content is left untouched. Written atomically (temporary file, then rename).
    """
    path = Path(path) if path is not None else data_dir() / SIMPLE_SEQUENCES_FILENAME
    examples = generate_simple_sequences(n_per_task=n_per_task, seed=seed)
    content = "".join(f"{ex}\n" for ex in examples).encode("utf-8")
    if path.is_file() and path.read_bytes() == content:
        if not quiet:
            print(f"{path}: up to date ({len(examples):,} examples, seed {seed})")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{path.name}.part-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        _use_default_permissions(Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if not quiet:
        tasks = ", ".join(SIMPLE_TASKS)
        print(f"{path}: wrote {len(examples):,} examples ({n_per_task} each of {tasks}; seed {seed})")
    return path


__all__ = [
    "SHAKESPEARE_URL", "SHAKESPEARE_BYTES", "SHAKESPEARE_SHA256", "SHAKESPEARE_FILENAME",
    "SOURCE_ENV", "SIMPLE_SEQUENCES_FILENAME", "SIMPLE_TASKS", "SIMPLE_ALPHABET",
    "DownloadError", "SourceNotFoundError", "FileCheck", "DatasetStats", "SequenceExample",
    "sha256_file", "verify_file", "fetch_verified", "ensure_shakespeare",
    "dataset_stats", "generate_simple_sequences", "solve_simple_task", "parse_simple_sequence",
    "load_simple_sequences", "make_simple_sequences",
]
