"""Serving: answer many generation requests with one model, batching them together.

A model on a server gets requests one at a time, from many clients at once. Running each request
alone wastes the hardware: one forward pass over a batch of 8 sequences costs far less than 8
passes over one. `BatchGenerationServer` therefore puts requests in a queue, and a single worker
thread takes up to `max_batch_size` of them at a time (waiting at most `max_wait_ms` for a batch
to fill), runs them through `TextGenerator.generate_batch` (left padding + KV cache) and hands each
caller its own result through a `Future`.

Requests can only share a batch when they share their generation settings (one temperature per
batch), so the worker groups what it took from the queue by settings. A sampled request with
its own `seed` runs alone, so that it is reproducible: the same request always gets the same text.

`make_http_server` puts a small REST endpoint in front of it, built on the standard library's
`http.server` (no extra packages):

    GET  /health      -> {"status": "ok", "model": {...}, "stats": {...}}
    POST /generate    {"prompt": "ROMEO:", "max_new_tokens": 100, "temperature": 0.8, "top_k": 40}
                      -> {"text": "...", "results": [{"text", "num_tokens", "stop_reason"}], ...}
                      ("prompts": [...] sends several prompts in one request)

Everything a client sends is checked before it reaches the model: the body must be JSON, at most
`max_body_bytes` long, with known fields of the right types and ranges, and prompts made of
characters the tokenizer knows. Errors come back as JSON `{"error": "..."}` with a 4xx status that
says what was wrong and how to fix it. The server binds to 127.0.0.1 (this machine only) unless
told otherwise: it has no authentication, so do not expose it to a network you do not trust.

    >>> with BatchGenerationServer(model, tokenizer) as server, serve_in_background(server) as http:
    ...     print(http.url)            # e.g. http://127.0.0.1:49152
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tiny_transformer.sampling import GenerationResult, GeneratorConfig, TextGenerator

# Generation settings a client may send, with the JSON types accepted for each.
REQUEST_FIELDS: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_k": (int, type(None)),
    "top_p": (int, float, type(None)),
    "min_p": (int, float, type(None)),
    "repetition_penalty": (int, float),
    "do_sample": (bool,),
    "seed": (int, type(None)),
    "stop": (str, list, type(None)),
}


@dataclass
class ServerConfig:
    """Limits of a `BatchGenerationServer` and its HTTP endpoint. Every one bounds some resource."""

    max_batch_size: int = 8  # requests run together in one batch
    max_wait_ms: float = 10.0  # how long the worker waits for more requests to fill a batch
    max_queue: int = 64  # requests waiting; more are refused (HTTP 503) instead of piling up
    max_prompts_per_request: int = 8
    max_prompt_chars: int = 2000
    max_new_tokens_limit: int = 500  # the largest max_new_tokens a request may ask for
    default_max_new_tokens: int = 100  # used when a request does not say (capped by the limit)
    request_timeout_s: float = 120.0  # a caller waits at most this long for its result
    max_body_bytes: int = 64 * 1024  # larger HTTP bodies are refused (413) without being read
    socket_timeout_s: float = 10.0  # a client that stops sending mid-request is disconnected

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_prompts_per_request", "max_prompt_chars",
                     "max_new_tokens_limit", "default_max_new_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ServerConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_wait_ms", "request_timeout_s", "socket_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ServerConfig.{name} must be a number >= 0, got {value!r}")


class ServerBusy(RuntimeError):
    """The request queue is full; the client should retry later (HTTP 503)."""


class ServerStopped(RuntimeError):
    """The server was stopped before this request ran."""


@dataclass
class _Request:
    prompt: str
    config: GeneratorConfig
    future: Future
    enqueued: float


def _settings_key(cfg: GeneratorConfig) -> tuple:
    """Requests with equal keys can share one `generate_batch` call."""
    return tuple((f.name, repr(getattr(cfg, f.name))) for f in fields(GeneratorConfig))


class BatchGenerationServer:
    """Batches concurrent generation requests for one model (thread-safe; one worker thread).

    `submit(prompt, **settings)` returns a `Future` at once; `generate(prompt, **settings)` waits for
    the result. Settings are `GeneratorConfig` fields (temperature, top_k, top_p, max_new_tokens,
    seed, ...) and are validated before the request is queued. Use it as a context manager, or call
    `start()` and `stop()`.
    """

    def __init__(self, model, tokenizer, config: ServerConfig | None = None, device=None):
        self.config = config or ServerConfig()
        self.generator = TextGenerator(model, tokenizer, device=device)
        self.model, self.tokenizer = self.generator.model, tokenizer
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=self.config.max_queue)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "batches": 0, "generated_tokens": 0, "largest_batch": 0, "errors": 0}

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> BatchGenerationServer:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping.clear()
        self._thread = threading.Thread(target=self._worker, name="batch-generation", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail every request still queued, and end the worker."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                self._queue.put_nowait(None)  # wake the worker if it is waiting for work
            except queue.Full:
                pass
            thread.join(timeout)
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None and not request.future.done():
                request.future.set_exception(ServerStopped("the server stopped before this request ran"))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> BatchGenerationServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests -------------------------------------------------------------------------------
    def make_config(self, **settings) -> GeneratorConfig:
        """A validated `GeneratorConfig` from request settings, within this server's limits."""
        unknown = sorted(set(settings) - set(REQUEST_FIELDS))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; allowed: {', '.join(REQUEST_FIELDS)}")
        for name, value in settings.items():
            allowed = REQUEST_FIELDS[name]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise ValueError(f"{name} must be {names}, got {type(value).__name__} {value!r}")
        settings.setdefault("max_new_tokens", min(self.config.default_max_new_tokens,
                                                  self.config.max_new_tokens_limit))
        if settings["max_new_tokens"] > self.config.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens={settings['max_new_tokens']} exceeds this server's limit of "
                             f"{self.config.max_new_tokens_limit}; ask for fewer tokens")
        if isinstance(settings.get("stop"), list) and len(settings["stop"]) > 8:
            raise ValueError("at most 8 stop strings are allowed")
        return GeneratorConfig(**settings)  # checks ranges (temperature >= 0, 0 < top_p <= 1, ...)

    def check_prompt(self, prompt) -> None:
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty; send at least one character, e.g. \"ROMEO:\"")
        if len(prompt) > self.config.max_prompt_chars:
            raise ValueError(f"the prompt has {len(prompt)} characters; this server accepts at most "
                             f"{self.config.max_prompt_chars}")
        try:
            self.tokenizer.encode(prompt)
        except ValueError as exc:
            raise ValueError(f"the prompt cannot be encoded: {exc}") from None

    def submit(self, prompt: str, **settings) -> Future:
        """Queue one prompt; returns a Future of its `GenerationResult`. Raises ValueError for bad
        input and `ServerBusy` when the queue is full."""
        if not self.running:
            raise ServerStopped("the server is not running; call start() (or use it in a `with` block)")
        self.check_prompt(prompt)
        request = _Request(prompt, self.make_config(**settings), Future(), time.perf_counter())
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise ServerBusy(f"the request queue is full ({self.config.max_queue} waiting); "
                             "retry in a moment") from None
        return request.future

    def generate(self, prompt: str, timeout: float | None = None, **settings) -> GenerationResult:
        """Submit and wait (at most `timeout` seconds, default `config.request_timeout_s`)."""
        future = self.submit(prompt, **settings)
        return self.wait(future, timeout)

    def wait(self, future: Future, timeout: float | None = None) -> GenerationResult:
        try:
            return future.result(timeout=self.config.request_timeout_s if timeout is None else timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError("the request did not finish in time; ask for fewer tokens or retry") from None

    def stats(self) -> dict:
        """Counters since start: requests, batches, generated_tokens, largest_batch, errors,
        mean_batch_size, queued."""
        with self._lock:
            out = dict(self._stats)
        out["mean_batch_size"] = out["requests"] / out["batches"] if out["batches"] else 0.0
        out["queued"] = self._queue.qsize()
        return out

    # -- the worker -------------------------------------------------------------------------------
    def _collect(self) -> list[_Request]:
        """Block for the first request, then gather more until the batch is full or the wait is over."""
        first = self._queue.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.config.max_wait_ms / 1000
        while len(batch) < self.config.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stopping.set()
                break
            batch.append(item)
        return batch

    def _worker(self) -> None:
        while not self._stopping.is_set():
            batch = [r for r in self._collect() if r.future.set_running_or_notify_cancel()]
            groups: dict[tuple, list[_Request]] = {}
            for request in batch:
                key = _settings_key(request.config)
                if request.config.seed is not None and not request.config.greedy:
                    # A seeded sample must not depend on its batch mates: it runs alone and gives
                    # exactly what TextGenerator.generate gives for it.
                    key += (id(request),)
                groups.setdefault(key, []).append(request)
            for group in groups.values():
                self._run_group(group)
        # Requests taken off the queue are always answered above; the rest are failed by stop().

    def _run_group(self, group: list[_Request]) -> None:
        try:
            results = self.generator.generate_batch([r.prompt for r in group], group[0].config)
        except Exception as exc:  # answer every caller instead of killing the worker thread
            with self._lock:
                self._stats["errors"] += len(group)
            for request in group:
                request.future.set_exception(exc)
            return
        with self._lock:
            self._stats["requests"] += len(group)
            self._stats["batches"] += 1
            self._stats["largest_batch"] = max(self._stats["largest_batch"], len(group))
            self._stats["generated_tokens"] += sum(r.num_tokens for r in results)
        for request, result in zip(group, results):
            result.stats["batch_size"] = len(group)
            result.stats["queue_seconds"] = time.perf_counter() - request.enqueued - result.seconds
            request.future.set_result(result)


# --------------------------------------------------------------------------------------------
# HTTP endpoint
# --------------------------------------------------------------------------------------------
class _HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def parse_generate_request(body: bytes, server: BatchGenerationServer) -> tuple[list[str], dict]:
    """Validate a POST /generate body: returns (prompts, settings). Raises ValueError with a message
    for the client."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("the request body is not UTF-8 text; send JSON encoded as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"the request body is not valid JSON ({exc.msg} at character {exc.pos}); "
                         'send e.g. {"prompt": "ROMEO:", "max_new_tokens": 50}') from None
    if not isinstance(payload, dict):
        raise ValueError('the JSON body must be an object such as {"prompt": "ROMEO:"}')
    if ("prompt" in payload) == ("prompts" in payload):
        raise ValueError('send exactly one of "prompt" (a string) or "prompts" (a list of strings)')
    if "prompt" in payload:
        prompts = [payload.pop("prompt")]
    else:
        prompts = payload.pop("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise ValueError('"prompts" must be a non-empty list of strings')
        if len(prompts) > server.config.max_prompts_per_request:
            raise ValueError(f'"prompts" has {len(prompts)} entries; at most '
                             f"{server.config.max_prompts_per_request} per request")
    for i, prompt in enumerate(prompts):
        try:
            server.check_prompt(prompt)
        except ValueError as exc:
            raise ValueError(f"prompt {i}: {exc}" if len(prompts) > 1 else str(exc)) from None
    server.make_config(**payload)  # validate the settings now, before anything is queued
    return prompts, payload


class _Handler(BaseHTTPRequestHandler):
    server_version = "tiny-transformer"
    protocol_version = "HTTP/1.1"

    # The ThreadingHTTPServer subclass below sets these.
    server: GenerationHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.batch_server.config.socket_timeout_s
        super().setup()

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: HTTPStatus, payload: dict, close: bool = False) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        self._send_json(status, {"error": message, "status": int(status)}, close=close)

    def do_GET(self) -> None:
        batch = self.server.batch_server
        if self.path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok" if batch.running else "stopped",
                                            "model": self.server.model_info, "stats": batch.stats()})
        elif self.path == "/":
            self._send_json(HTTPStatus.OK, {
                "endpoints": {"GET /health": "status and counters",
                              "POST /generate": 'JSON {"prompt": "...", "max_new_tokens": 100, ...}'},
                "settings": sorted(REQUEST_FIELDS), "limits": asdict(batch.config)})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}; use GET /health or POST /generate")

    def do_POST(self) -> None:
        try:
            if self.path != "/generate":
                raise _HTTPError(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}; POST to /generate")
            body = self._read_body()
            self._send_json(HTTPStatus.OK, self._generate(body))
        except _HTTPError as exc:
            # After a refused body the connection holds unread bytes: close it.
            self._error(exc.status, str(exc), close=exc.status != HTTPStatus.NOT_FOUND)

    def _read_body(self) -> bytes:
        limit = self.server.batch_server.config.max_body_bytes
        content_type = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                             f"Content-Type {content_type!r} is not supported; send application/json")
        if self.headers.get("Transfer-Encoding"):
            raise _HTTPError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise _HTTPError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header (a byte count) is required")
        length = int(length)
        if length > limit:
            self._discard(length)
            raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"the body has {length} bytes; this server accepts at most {limit}")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _HTTPError(HTTPStatus.REQUEST_TIMEOUT, "the body did not arrive in time") from None
        if len(body) != length:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {length} bytes")
        return body

    def _discard(self, length: int, most: int = 1 << 20) -> None:
        """Read and drop a refused body (up to `most` bytes). Closing a socket that still holds
        unread bytes makes the kernel reset the connection, and the client would then see a reset
        instead of our JSON error. A body larger than `most` is not worth reading: we close anyway."""
        left = min(length, most)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _generate(self, body: bytes) -> dict:
        batch = self.server.batch_server
        try:
            prompts, settings = parse_generate_request(body, batch)
            futures = [batch.submit(p, **settings) for p in prompts]
        except ServerBusy as exc:
            raise _HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None
        except ServerStopped as exc:
            raise _HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None
        except ValueError as exc:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        start = time.perf_counter()
        results = []
        for future in futures:
            try:
                result = batch.wait(future)
            except TimeoutError as exc:
                raise _HTTPError(HTTPStatus.GATEWAY_TIMEOUT, str(exc)) from None
            except ServerStopped as exc:
                raise _HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None
            except Exception as exc:
                raise _HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {exc}") from None
            results.append({"text": result.text, "num_tokens": result.num_tokens,
                            "stop_reason": result.stop_reason, "batch_size": result.stats.get("batch_size", 1)})
        response = {"results": results, "seconds": round(time.perf_counter() - start, 4)}
        if len(results) == 1:
            response["text"] = results[0]["text"]
        return response


class GenerationHTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` serving a `BatchGenerationServer`; `url` is where it listens."""

    daemon_threads = True  # a stuck client thread never blocks interpreter exit

    def __init__(self, batch_server: BatchGenerationServer, host: str = "127.0.0.1", port: int = 8000,
                 verbose: bool = False):
        self.batch_server, self.verbose = batch_server, verbose
        self._handler_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        model = batch_server.model
        self.model_info = {"type": type(model).__name__, "parameters": model.num_parameters(),
                           "vocab_size": model.vocab_size, "max_seq_len": model.max_seq_len}
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
                               "(0 picks a free one)") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        """One thread per connection (a daemon, see `daemon_threads`), as ThreadingHTTPServer does,
        remembered (weakly) so that `server_close` can wait for the ones still finishing a response."""
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="generation-http-client", daemon=self.daemon_threads)
        self._handler_threads.add(thread)
        thread.start()

    def server_close(self, wait: float = 2.0) -> None:
        """Close the listening socket, then give handler threads that are still finishing a response
        up to `wait` seconds in all. Handler threads are daemons (a stuck client cannot keep the
        program alive), and a daemon thread still writing when the interpreter shuts down can abort
        the process; waiting here makes a Ctrl-C exit clean."""
        super().server_close()
        deadline = time.monotonic() + wait
        for thread in list(getattr(self, "_handler_threads", ())):
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up or times out is normal for a server: stay quiet about it (unless
        verbose); report anything else in one line instead of a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) and not self.verbose:
            return
        if self.verbose:
            super().handle_error(request, client_address)
        else:
            print(f"error while serving {client_address[0]}: {exc!r}", file=sys.stderr, flush=True)


def make_http_server(batch_server: BatchGenerationServer, host: str = "127.0.0.1", port: int = 8000,
                     verbose: bool = False) -> GenerationHTTPServer:
    """A REST endpoint for `batch_server` on `host:port` (port 0: any free port). Call
    `serve_forever()` on it, or use `serve_in_background`."""
    return GenerationHTTPServer(batch_server, host, port, verbose)


class BackgroundHTTPServer:
    """An HTTP server running in a background thread; `close()` (or leaving `with`) shuts it down."""

    def __init__(self, httpd: GenerationHTTPServer):
        self.httpd = httpd
        self.thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="generation-http", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return self.httpd.url

    def close(self) -> None:
        self.httpd.shutdown()  # stops serve_forever after the current poll
        self.httpd.server_close()  # releases the listening socket
        self.thread.join(timeout=10)

    def __enter__(self) -> BackgroundHTTPServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_in_background(batch_server: BatchGenerationServer, host: str = "127.0.0.1", port: int = 0,
                        verbose: bool = False) -> BackgroundHTTPServer:
    """Start the REST endpoint in a thread (for notebooks and tests); returns a handle with `url`."""
    if not batch_server.running:
        batch_server.start()
    return BackgroundHTTPServer(make_http_server(batch_server, host, port, verbose))


def post_json(url: str, payload, timeout: float = 60.0) -> tuple[int, dict]:
    """POST JSON to `url` with the standard library; returns (HTTP status, decoded JSON reply).

    A small client for notebooks and tests: error statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode("utf-8") or "{}")


def get_json(url: str, timeout: float = 10.0) -> tuple[int, dict]:
    """GET `url` and decode the JSON reply; returns (HTTP status, payload)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode("utf-8") or "{}")
