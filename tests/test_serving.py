"""The batch-generation server and its REST endpoint (all traffic stays on 127.0.0.1)."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tiny_transformer import cli
from tiny_transformer.checkpoint import FORMAT, VERSION, save_checkpoint
from tiny_transformer.model import TinyTransformerLM, TransformerConfig
from tiny_transformer.sampling import TextGenerator
from tiny_transformer.serving import (
    BatchGenerationServer,
    ServerBusy,
    ServerConfig,
    ServerStopped,
    get_json,
    post_json,
    serve_in_background,
)
from tiny_transformer.tokenizers import CharTokenizer

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = CharTokenizer(CHARS)
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_layers=2, max_seq_len=64)
    return TinyTransformerLM(cfg).eval(), tok


def make_server(model_and_tokenizer, **limits):
    model, tok = model_and_tokenizer
    return BatchGenerationServer(model, tok, ServerConfig(**limits))


# ----------------------------------------------------------------------------------------------
# The batch server


def test_concurrent_requests_are_batched_and_match_single_generation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = ["ROMEO:", "JULIET: O", "First Citizen:\nWe", "A"]
    with make_server(model_and_tokenizer, max_wait_ms=300) as server:
        futures = [server.submit(p, max_new_tokens=12, do_sample=False) for p in prompts]
        results = [server.wait(f, timeout=60) for f in futures]
        stats = server.stats()
    alone = TextGenerator(model, tok)
    for prompt, result in zip(prompts, results):
        expected = alone.generate(prompt, max_new_tokens=12, do_sample=False)
        assert result.tokens == expected.tokens, f"batched greedy output differs for {prompt!r}"
        assert result.num_tokens == 12 and result.stats["batch_size"] == 4
    assert stats["requests"] == 4 and stats["batches"] == 1 and stats["largest_batch"] == 4
    assert stats["generated_tokens"] == 48 and stats["mean_batch_size"] == 4.0


def test_different_settings_run_in_separate_groups_and_seeds_reproduce(model_and_tokenizer):
    with make_server(model_and_tokenizer, max_wait_ms=300) as server:
        settings = [dict(seed=1, temperature=0.9), dict(seed=1, temperature=0.9), dict(seed=2, temperature=0.9),
                    dict(temperature=0.5), dict(temperature=0.5), dict(temperature=0.7)]
        futures = [server.submit("ROMEO:", max_new_tokens=20, **s) for s in settings]
        a, b, c, d, e, f = (server.wait(f, timeout=60) for f in futures)
        # Seeded samples run alone (3 batches); the unseeded ones group by temperature (2 batches).
        assert server.stats()["batches"] == 5
    assert [r.stats["batch_size"] for r in (a, b, c, d, e, f)] == [1, 1, 1, 2, 2, 1]
    assert a.text == b.text != c.text, "the same seed and settings must give the same text"
    alone = TextGenerator(*model_and_tokenizer).generate("ROMEO:", max_new_tokens=20, seed=2, temperature=0.9)
    assert alone.text == c.text, "a seeded request gives what TextGenerator.generate gives alone"


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="x" * 101), "at most 100"),
    (dict(prompt="ROMEO: 42"), "'4'"),
    (dict(prompt=7), "must be a string"),
    (dict(prompt="A", temperature=-1), "temperature must be a number >= 0"),
    (dict(prompt="A", temperature="hot"), "temperature must be int or float"),
    (dict(prompt="A", max_new_tokens=51), "exceeds this server's limit of 50"),
    (dict(prompt="A", max_new_tokens=True), "max_new_tokens must be int"),
    (dict(prompt="A", top_p=1.5), "top_p"),
    (dict(prompt="A", num_beams=4), "unknown setting"),
])
def test_bad_requests_are_refused_before_queueing(model_and_tokenizer, kwargs, message):
    with make_server(model_and_tokenizer, max_prompt_chars=100, max_new_tokens_limit=50,
                     default_max_new_tokens=10) as server:
        prompt = kwargs.pop("prompt")
        with pytest.raises(ValueError, match=message):
            server.submit(prompt, **kwargs)
        assert server.stats()["queued"] == 0


def test_server_config_is_validated():
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        ServerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms must be a number >= 0"):
        ServerConfig(max_wait_ms=-1)


def test_full_queue_stop_and_errors(model_and_tokenizer):
    server = make_server(model_and_tokenizer, max_queue=2, max_batch_size=1, max_wait_ms=0)
    with pytest.raises(ServerStopped, match="call start"):
        server.submit("A")
    release = threading.Event()
    real = server.generator.generate_batch
    server.generator.generate_batch = lambda *a, **k: (release.wait(30), real(*a, **k))[1]
    server.start()
    first = server.submit("A", max_new_tokens=2)
    deadline = time.time() + 10
    while server.stats()["queued"] and time.time() < deadline:  # the worker has taken `first`
        time.sleep(0.01)
    waiting = [server.submit("B", max_new_tokens=2), server.submit("C", max_new_tokens=2)]
    with pytest.raises(ServerBusy, match="queue is full"):
        server.submit("D")
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    time.sleep(0.1)
    release.set()
    stopper.join(30)
    assert first.result(timeout=10).num_tokens == 2, "the batch in progress finishes"
    for f in waiting:
        with pytest.raises(ServerStopped):
            f.result(timeout=10)
    assert not server.running

    # A failing generation is reported to its caller and the worker keeps serving.
    server = make_server(model_and_tokenizer)
    calls = []

    def flaky(prompts, cfg):
        calls.append(prompts)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(prompts, cfg)

    server.generator.generate_batch = flaky
    with server:
        with pytest.raises(RuntimeError, match="simulated"):
            server.generate("A", max_new_tokens=2, timeout=30)
        assert server.generate("A", max_new_tokens=2, timeout=30).num_tokens == 2
        assert server.stats()["errors"] == 1


# ----------------------------------------------------------------------------------------------
# HTTP endpoint


def raw_request(url, method, path, body=b"", headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read().decode("utf-8"))
    finally:
        conn.close()


def test_http_generate_health_and_validation(model_and_tokenizer):
    with make_server(model_and_tokenizer, max_body_bytes=2048, max_new_tokens_limit=40) as server, \
            serve_in_background(server) as http_server:
        url = http_server.url
        assert url.startswith("http://127.0.0.1:")
        status, health = get_json(url + "/health")
        assert status == 200 and health["status"] == "ok"
        assert health["model"]["vocab_size"] == len(CHARS) and health["model"]["max_seq_len"] == 64

        status, reply = post_json(url + "/generate", {"prompt": "ROMEO:", "max_new_tokens": 15, "do_sample": False})
        assert status == 200, reply
        assert reply["results"][0]["num_tokens"] == 15 and reply["results"][0]["stop_reason"] == "length"
        expected = TextGenerator(*model_and_tokenizer).generate("ROMEO:", max_new_tokens=15, do_sample=False)
        assert reply["text"] == expected.text

        status, reply = post_json(url + "/generate", {"prompts": ["A", "BB", "CCC"], "max_new_tokens": 5,
                                                      "temperature": 0.8, "top_k": 5})
        assert status == 200 and len(reply["results"]) == 3 and "text" not in reply
        assert [r["batch_size"] for r in reply["results"]] == [3, 3, 3]
        status, reply = post_json(url + "/generate", {"prompt": "A"})  # default length, capped by the limit
        assert status == 200 and reply["results"][0]["num_tokens"] == 40

        bad = [
            (b"{not json", 400, "not valid JSON"),
            (b"[1, 2]", 400, "must be an object"),
            (json.dumps({"prompt": "A", "prompts": ["B"]}).encode(), 400, "exactly one of"),
            (json.dumps({"prompt": "A", "temprature": 1}).encode(), 400, "unknown setting"),
            (json.dumps({"prompt": "A", "max_new_tokens": 41}).encode(), 400, "limit of 40"),
            (json.dumps({"prompts": ["A", "5"]}).encode(), 400, "prompt 1:"),
            (json.dumps({"prompts": []}).encode(), 400, "non-empty list"),
            (json.dumps({"prompt": "A" * 3000}).encode(), 413, "at most 2048"),
        ]
        for body, code, message in bad:
            status, reply = post_json(url + "/generate", body)
            assert status == code and message in reply["error"], (body[:40], status, reply)

        status, reply = raw_request(url, "POST", "/generate", b"{}", {"Content-Type": "text/plain",
                                                                     "Content-Length": "2"})
        assert status == 415 and "application/json" in reply["error"]
        status, reply = raw_request(url, "POST", "/generate", headers={"Content-Type": "application/json"})
        assert status == 411 and "Content-Length" in reply["error"]
        status, reply = raw_request(url, "POST", "/elsewhere", b"{}", {"Content-Length": "2"})
        assert status == 404
        status, reply = get_json(url + "/nothing")
        assert status == 404 and "/generate" in reply["error"]
        assert server.stats()["requests"] == 5  # only the valid requests reached the model

    # After the `with`, the port is released and the worker has stopped.
    with pytest.raises(OSError):
        get_json(url + "/health", timeout=2)
    assert not server.running


# ----------------------------------------------------------------------------------------------
# CLI


def test_server_close_waits_briefly_for_handlers_and_stays_quiet_about_hangups(model_and_tokenizer, capsys):
    import socket

    from tiny_transformer.serving import make_http_server

    with make_server(model_and_tokenizer) as server:
        httpd = make_http_server(server, "127.0.0.1", 0)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        idle = socket.create_connection(httpd.server_address[:2])  # a client that never sends a request
        deadline = time.time() + 5
        while not list(httpd._handler_threads) and time.time() < deadline:
            time.sleep(0.01)
        assert len(list(httpd._handler_threads)) == 1
        httpd.shutdown()
        t0 = time.perf_counter()
        httpd.server_close(wait=0.3)  # the idle client holds its handler: the wait is bounded
        assert time.perf_counter() - t0 < 2.0
        idle.close()
        for handler in list(httpd._handler_threads):
            handler.join(5)
        assert not any(t.is_alive() for t in httpd._handler_threads)
        try:
            raise ConnectionResetError("peer hung up")
        except ConnectionResetError:
            httpd.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("boom")
        except ValueError:
            httpd.handle_error(None, ("127.0.0.1", 1))
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "ValueError('boom')" in err


def write_checkpoint(path: Path, model, tok) -> Path:
    return save_checkpoint({
        "format": FORMAT, "version": VERSION, "kind": "production", "model": model.state_dict(),
        "config": {"model_type": "gpt", "model": model.config.to_dict()}, "tokenizer": tok.to_dict(),
        "step": 7, "val_loss": None,
    }, path)


def test_cli_serve_answers_and_stops_cleanly_on_ctrl_c(tmp_path, model_and_tokenizer):
    ckpt = write_checkpoint(tmp_path / "model.pt", *model_and_tokenizer)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiny_transformer", "serve", "--checkpoint", str(ckpt), "--port", "0",
         "--device", "cpu", "--max-new-tokens", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        url = None
        deadline = time.time() + 60
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("listening on "):
                url = line.split()[2]
        assert url, f"server did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
        status, reply = post_json(url + "/generate", {"prompt": "ROMEO:", "max_new_tokens": 8})
        assert status == 200 and reply["results"][0]["num_tokens"] == 8
        status, reply = post_json(url + "/generate", {"prompt": "ROMEO:", "max_new_tokens": 31})
        assert status == 400 and "limit of 30" in reply["error"]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        assert code == 0, f"exit code {code}; stderr:\n{proc.stderr.read()[-3000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_cli_serve_reports_a_missing_checkpoint(tmp_path, capsys):
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "nope.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "does not exist" in err
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "nope.pt"), "--port", "70000"]) == 1
    assert "--port must be between 0 and 65535" in capsys.readouterr().err
