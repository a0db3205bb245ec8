"""Tests for tiny_transformer.download, the download CLI and data/download_shakespeare.sh.

The download code runs against a real HTTP server on 127.0.0.1 (http.server in a thread), which
serves good, truncated, cut-off, oversized and wrong files. Most tests use a small fake file and
swap the expected size/sha256; one serves the real Tiny Shakespeare from ../shared/data.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tiny_transformer import cli, download
from tiny_transformer.download import (
    DownloadError,
    SequenceExample,
    SourceNotFoundError,
    dataset_stats,
    ensure_shakespeare,
    generate_simple_sequences,
    load_simple_sequences,
    make_simple_sequences,
    parse_simple_sequence,
    solve_simple_task,
    verify_file,
)
from tiny_transformer.utils import data_dir, repo_root

REPO = repo_root()
# The real file: ../shared/data next to the repository, or wherever TINY_SHAKESPEARE_SOURCE points.
SHARED_SHAKESPEARE = next(
    (p for p in (Path(os.environ.get("TINY_SHAKESPEARE_SOURCE", "")),
                 REPO.parent / "shared" / "data" / "tiny_shakespeare.txt") if p.is_file()),
    REPO.parent / "shared" / "data" / "tiny_shakespeare.txt",
)
SCRIPT = REPO / "data" / "download_shakespeare.sh"
FAKE = b"First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40

needs_shared = pytest.mark.skipif(
    not SHARED_SHAKESPEARE.is_file(), reason="no local Tiny Shakespeare (../shared/data or $TINY_SHAKESPEARE_SOURCE)"
)


# --------------------------------------------------------------------------------------------
# A local HTTP server with scripted answers


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the name http.server calls)
        self.server.hits.append(self.path)
        kind, body = self.server.routes.get(self.path, ("status", 404))
        if kind == "status":
            self.send_error(body)
            return
        self.send_response(200)
        if kind == "ok":  # an honest response
            self.send_header("Content-Length", str(len(body)))
        elif kind == "cut":  # announces twice the bytes, then the connection drops
            self.send_header("Content-Length", str(2 * len(body)))
        elif kind == "announce_huge":
            self.send_header("Content-Length", str(10**9))
        # kind == "nolength": no Content-Length; the body ends when the connection closes
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.hits = {}, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fake_expected(monkeypatch):
    """Make the small FAKE file the 'expected' dataset."""
    monkeypatch.setattr(download, "SHAKESPEARE_BYTES", len(FAKE))
    monkeypatch.setattr(download, "SHAKESPEARE_SHA256", hashlib.sha256(FAKE).hexdigest())
    return FAKE


def leftovers(folder: Path) -> list[str]:
    """Temporary files a failed or finished download may have left behind (there must be none)."""
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


def fetch(dest, source, **kw):
    kw.setdefault("quiet", True)
    kw.setdefault("retry_delay", 0)
    return ensure_shakespeare(dest, source=source, **kw)


# --------------------------------------------------------------------------------------------
# Downloads over HTTP


def test_good_download_is_written_and_verified(tmp_path, server, fake_expected):
    server.routes["/input.txt"] = ("ok", FAKE)
    dest = tmp_path / "tiny_shakespeare.txt"
    assert fetch(dest, server.url + "/input.txt") == dest
    assert dest.read_bytes() == FAKE
    assert verify_file(dest).ok
    assert server.hits == ["/input.txt"]
    assert leftovers(tmp_path) == []
    # A new file gets ordinary permissions, not the private mode of the temporary file.
    assert dest.stat().st_mode & 0o444 == 0o444


@needs_shared
def test_real_shakespeare_through_local_server(tmp_path, server, capsys):
    real = SHARED_SHAKESPEARE.read_bytes()
    server.routes["/karpathy/char-rnn/input.txt"] = ("ok", real)
    dest = ensure_shakespeare(tmp_path / "tiny_shakespeare.txt",
                              source=server.url + "/karpathy/char-rnn/input.txt", retry_delay=0)
    check = verify_file(dest)
    assert check.ok and check.size == 1_115_394 and check.sha256 == download.SHAKESPEARE_SHA256
    out = capsys.readouterr().out
    assert "written and verified" in out
    assert "size           1,115,394 bytes" in out
    assert "lines          40,000" in out
    assert "words          202,651" in out
    assert "unique chars   65" in out
    assert "character set  \\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" in out


def test_truncated_file_is_rejected(tmp_path, server, fake_expected):
    server.routes["/short.txt"] = ("ok", FAKE[:-100])
    dest = tmp_path / "tiny_shakespeare.txt"
    with pytest.raises(DownloadError, match=r"gave 3,\d+ bytes, expected exactly 3,\d+"):
        fetch(dest, server.url + "/short.txt")
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_connection_cut_mid_file_is_retried_then_reported(tmp_path, server, fake_expected):
    server.routes["/cut.txt"] = ("cut", FAKE[:1000])  # announces 2,000 bytes, sends 1,000
    dest = tmp_path / "tiny_shakespeare.txt"
    with pytest.raises(DownloadError, match="tried 2 times") as info:
        fetch(dest, server.url + "/cut.txt", retries=2)
    assert "connection closed after 1,000 of 2,000 bytes" in str(info.value)
    assert server.hits == ["/cut.txt", "/cut.txt"]
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_wrong_checksum_is_rejected(tmp_path, server, fake_expected):
    wrong = FAKE.replace(b"speak", b"SPEAK")
    assert len(wrong) == len(FAKE)
    server.routes["/wrong.txt"] = ("ok", wrong)
    dest = tmp_path / "tiny_shakespeare.txt"
    with pytest.raises(DownloadError, match="right size but the wrong sha256"):
        fetch(dest, server.url + "/wrong.txt")
    assert not dest.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["announce_huge", "nolength"])
def test_oversized_response_is_refused_after_a_bounded_read(tmp_path, server, fake_expected, kind):
    big = FAKE * 100  # 100x the expected size, far past the read margin
    assert len(big) > len(FAKE) + download.READ_MARGIN
    server.routes["/big"] = (kind, big)
    dest = tmp_path / "tiny_shakespeare.txt"
    with pytest.raises(DownloadError, match="far more than the expected file"):
        fetch(dest, server.url + "/big")
    assert server.hits == ["/big"]  # not retried: a wrong file stays wrong
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_http_404_is_not_retried(tmp_path, server, fake_expected):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(tmp_path / "t.txt", server.url + "/missing.txt", retries=3)
    assert server.hits == ["/missing.txt"]
    assert "--source" in str(info.value)


def test_server_down_explains_the_offline_option(tmp_path, server, fake_expected):
    url = server.url + "/input.txt"
    server.shutdown()
    server.server_close()  # nothing listens on that port any more: connection refused
    dest = tmp_path / "tiny_shakespeare.txt"
    with pytest.raises(DownloadError) as info:
        fetch(dest, url, retries=2)
    message = str(info.value)
    assert "could not download" in message and "tried 2 times" in message
    assert "python -m tiny_transformer download shakespeare --source /path/to/" in message
    assert "bash data/download_shakespeare.sh --source /path/to/" in message
    assert "export TINY_SHAKESPEARE_SOURCE=/path/to/" in message
    assert isinstance(info.value, RuntimeError)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_interrupted_download_leaves_no_temporary_file(tmp_path, server, fake_expected, monkeypatch):
    server.routes["/input.txt"] = ("ok", FAKE)

    def interrupted(src, dst, limit, digest):
        dst.write(src.read(100))  # some bytes reach the temporary file...
        raise KeyboardInterrupt  # ...then the learner presses Ctrl-C

    monkeypatch.setattr(download, "_copy_bounded", interrupted)
    dest = tmp_path / "tiny_shakespeare.txt"
    with pytest.raises(KeyboardInterrupt):
        fetch(dest, server.url + "/input.txt")
    assert not dest.exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Offline sources, idempotence, replacing a bad copy


def test_local_path_file_url_and_env_var_sources(tmp_path, fake_expected, monkeypatch):
    local = tmp_path / "copy_of_input.txt"
    local.write_bytes(FAKE)
    for i, source in enumerate([str(local), local, local.as_uri()]):
        dest = tmp_path / f"out{i}" / "tiny_shakespeare.txt"
        fetch(dest, source)
        assert dest.read_bytes() == FAKE
    monkeypatch.setenv("TINY_SHAKESPEARE_SOURCE", str(local))
    dest = tmp_path / "from_env" / "tiny_shakespeare.txt"
    fetch(dest, None)
    assert dest.read_bytes() == FAKE


def test_default_destination_is_the_data_dir(tmp_path, fake_expected, monkeypatch):
    local = tmp_path / "input.txt"
    local.write_bytes(FAKE)
    monkeypatch.setenv("TINY_TRANSFORMER_DATA", str(tmp_path / "data"))
    path = fetch(None, local)
    assert path == data_dir() / "tiny_shakespeare.txt" == tmp_path / "data" / "tiny_shakespeare.txt"
    assert path.read_bytes() == FAKE


def test_missing_local_source_is_a_clear_file_not_found(tmp_path, fake_expected):
    with pytest.raises(SourceNotFoundError, match="does not exist") as info:
        fetch(tmp_path / "t.txt", tmp_path / "nope.txt")
    assert isinstance(info.value, FileNotFoundError)
    assert "--source PATH" in str(info.value)
    with pytest.raises(DownloadError, match="is a folder"):
        fetch(tmp_path / "t.txt", tmp_path)
    with pytest.raises(DownloadError, match="unsupported source"):
        fetch(tmp_path / "t.txt", "ftp://example.org/input.txt")


def test_second_call_does_not_download_again(tmp_path, server, fake_expected, capsys):
    server.routes["/input.txt"] = ("ok", FAKE)
    dest = tmp_path / "tiny_shakespeare.txt"
    fetch(dest, server.url + "/input.txt", quiet=False)
    mtime = dest.stat().st_mtime_ns
    capsys.readouterr()
    fetch(dest, server.url + "/input.txt", quiet=False)
    assert server.hits == ["/input.txt"]
    assert dest.stat().st_mtime_ns == mtime
    assert "already present and verified" in capsys.readouterr().out
    fetch(dest, server.url + "/input.txt", force=True)  # --force fetches again
    assert server.hits == ["/input.txt", "/input.txt"]


def test_corrupt_existing_copy_is_replaced(tmp_path, server, fake_expected, capsys):
    server.routes["/input.txt"] = ("ok", FAKE)
    dest = tmp_path / "tiny_shakespeare.txt"
    dest.write_bytes(FAKE[:500])  # e.g. an earlier download that was cut off
    fetch(dest, server.url + "/input.txt", quiet=False)
    assert dest.read_bytes() == FAKE
    assert "replacing it (invalid copy: it has 500 bytes" in capsys.readouterr().out
    assert leftovers(tmp_path) == []


def test_failed_replacement_keeps_the_old_file_untouched(tmp_path, server, fake_expected):
    server.routes["/wrong.txt"] = ("ok", b"x" * len(FAKE))
    dest = tmp_path / "tiny_shakespeare.txt"
    dest.write_bytes(b"my own notes")
    with pytest.raises(DownloadError):
        fetch(dest, server.url + "/wrong.txt")
    assert dest.read_bytes() == b"my own notes"
    assert leftovers(tmp_path) == []


def test_verify_file_reports_each_problem(tmp_path, fake_expected):
    path = tmp_path / "f.txt"
    check = verify_file(path)
    assert not check and check.problem == "the file does not exist" and check.size is None
    path.write_bytes(FAKE + b"!")
    check = verify_file(path)
    assert not check and check.size == len(FAKE) + 1 and "expected 3," in check.problem
    path.write_bytes(FAKE.upper())
    check = verify_file(path)
    assert not check and check.sha256 == hashlib.sha256(FAKE.upper()).hexdigest()
    assert "sha256" in check.problem
    path.write_bytes(FAKE)
    assert verify_file(path) and verify_file(path).problem == ""
    assert verify_file(tmp_path).problem == "the path is not a regular file"


def test_dataset_stats_counts_exactly(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("to be\nor not\tto be\né", encoding="utf-8")
    stats = dataset_stats(path)
    assert (stats.bytes, stats.characters, stats.lines, stats.words) == (21, 20, 3, 7)
    assert stats.charset == "\t\n benort\u00e9" and stats.unique_chars == 10
    assert stats.counts["o"] == 4
    assert "character set  \\t\\n benorté" in stats.summary()
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        dataset_stats(path)
    with pytest.raises(FileNotFoundError, match="download shakespeare"):
        dataset_stats(tmp_path / "missing.txt")


# --------------------------------------------------------------------------------------------
# The CLI command and the bash script


def test_cli_download_both_datasets(tmp_path, fake_expected, capsys):
    local = tmp_path / "input.txt"
    local.write_bytes(FAKE)
    out_dir = tmp_path / "data"
    assert cli.main(["download", "--source", str(local), "--data-dir", str(out_dir)]) == 0
    assert (out_dir / "tiny_shakespeare.txt").read_bytes() == FAKE
    assert len(load_simple_sequences(out_dir / "simple_sequences.txt")) == 1200
    assert "wrote 1,200 examples" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, server, fake_expected, capsys):
    url = server.url + "/gone.txt"
    server.shutdown()
    server.server_close()
    argv = ["download", "shakespeare", "--source", url, "--data-dir", str(tmp_path), "--retries", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not download") and "TINY_SHAKESPEARE_SOURCE" in err
    assert cli.main(["download", "simple", "--source", "x.txt"]) == 1
    assert "--source only applies to Tiny Shakespeare" in capsys.readouterr().err
    assert cli.main(["download", "shakespeare", "--retries", "0"]) == 1
    assert "--retries must be at least 1" in capsys.readouterr().err


def run_script(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TINY_SHAKESPEARE_SOURCE"}
    env.update({"PYTHON": sys.executable, **(env_extra or {})})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


@needs_shared
def test_bash_script_end_to_end(tmp_path):
    env = {"TINY_TRANSFORMER_DATA": str(tmp_path)}
    result = run_script("--source", str(SHARED_SHAKESPEARE), env_extra=env)
    assert result.returncode == 0, result.stderr
    assert verify_file(tmp_path / "tiny_shakespeare.txt").ok
    assert (tmp_path / "simple_sequences.txt").is_file()
    assert "unique chars   65" in result.stdout
    again = run_script(env_extra={**env, "TINY_SHAKESPEARE_SOURCE": str(SHARED_SHAKESPEARE)})
    assert again.returncode == 0, again.stderr
    assert "already present and verified" in again.stdout
    assert "simple_sequences.txt: up to date" in again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["simple_sequences.txt",
                                                           "tiny_shakespeare.txt"]


def test_bash_script_env_var_help_and_errors(tmp_path):
    helped = run_script("--help")
    assert helped.returncode == 0 and "--source PATH_OR_URL" in helped.stdout
    assert "TINY_SHAKESPEARE_SOURCE" in helped.stdout
    bad = run_script("--frobnicate")
    assert bad.returncode == 2 and "unknown option '--frobnicate'" in bad.stderr
    missing = run_script(f"--source={tmp_path / 'nope.txt'}",
                         env_extra={"TINY_TRANSFORMER_DATA": str(tmp_path)})
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: the source file") and "Traceback" not in missing.stderr
    no_value = run_script("--source")
    assert no_value.returncode == 2 and "--source needs a value" in no_value.stderr


# --------------------------------------------------------------------------------------------
# Simple sequences


def test_simple_sequences_are_deterministic_and_correct():
    a = generate_simple_sequences(n_per_task=50, seed=3)
    assert a == generate_simple_sequences(n_per_task=50, seed=3)
    assert a != generate_simple_sequences(n_per_task=50, seed=4)
    assert len(a) == 300 and {ex.task for ex in a} == set(download.SIMPLE_TASKS)
    assert all(ex.is_correct() for ex in a)
    line = re.compile(r"^(copy|reverse|sort|count): [a-h]{3,8}\|[a-h0-9]+$"
                      r"|^add: \d{1,3}\+\d{1,3}\|\d{1,4}$|^parity: [01]{3,8}\|[01]$")
    for ex in a:
        assert line.match(str(ex)), str(ex)
        assert parse_simple_sequence(str(ex) + "\n") == ex


def test_simple_sequence_rules_and_golden_lines():
    assert solve_simple_task("copy", "cfba") == "cfba"
    assert solve_simple_task("reverse", "cfba") == "abfc"
    assert solve_simple_task("sort", "cfba") == "abcf"
    assert solve_simple_task("count", "cabca") == "a2b1c2"
    assert solve_simple_task("add", "47+385") == "432"
    assert solve_simple_task("parity", "10110") == "1"
    with pytest.raises(ValueError, match="unknown task 'rot13'"):
        solve_simple_task("rot13", "abc")
    # The default file (seed 0) starts with these lines on every machine.
    first = [str(ex) for ex in generate_simple_sequences()[:4]]
    assert first == ["add: 895+186|1081", "parity: 011|0", "sort: egabfagc|aabcefgg",
                     "add: 107+106|213"]


def test_parse_errors_name_the_line():
    with pytest.raises(ValueError, match=r"line 7: expected 'task: prompt\|answer'"):
        parse_simple_sequence("copy abc|abc", line_number=7)
    with pytest.raises(ValueError, match="unknown task 'rotate'"):
        parse_simple_sequence("rotate: abc|bca")
    with pytest.raises(ValueError, match="expected 'task: prompt"):
        parse_simple_sequence("copy: abc|a|b")
    assert parse_simple_sequence("sort: cba|abc") == SequenceExample("sort", "cba", "abc")


def test_make_simple_sequences_is_idempotent(tmp_path, capsys):
    path = make_simple_sequences(tmp_path / "simple_sequences.txt")
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1200 and text.endswith("\n")
    examples = load_simple_sequences(path)
    assert sum(ex.task == "reverse" for ex in examples) == 200
    mtime = path.stat().st_mtime_ns
    make_simple_sequences(path)
    assert path.stat().st_mtime_ns == mtime
    assert "up to date (1,200 examples, seed 0)" in capsys.readouterr().out
    path.write_text("copy: abc|abc\n", encoding="utf-8")  # a stale or edited file is rewritten
    make_simple_sequences(path, quiet=True)
    assert path.read_text(encoding="utf-8") == text
    assert leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="download simple"):
        load_simple_sequences(tmp_path / "none.txt")
