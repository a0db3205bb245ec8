"""`python -m tiny_transformer serve --checkpoint PATH`: a REST endpoint that generates text.

    serve --checkpoint checkpoints/shakespeare/best.pt              http://127.0.0.1:8000
    serve --checkpoint production.pt --port 0                       any free port (printed)

Then, from another terminal:

    curl -s http://127.0.0.1:8000/generate -H 'Content-Type: application/json' \\
         -d '{"prompt": "ROMEO:", "max_new_tokens": 100, "temperature": 0.8, "top_k": 40}'

Concurrent requests are batched (see `tiny_transformer.serving`). Ctrl-C stops the server cleanly:
the batch in progress finishes, and the listening socket is released.
"""

from __future__ import annotations

import argparse
import sys

from tiny_transformer.checkpoint import load_model_from_checkpoint
from tiny_transformer.serving import BatchGenerationServer, ServerConfig, make_http_server
from tiny_transformer.utils import select_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a training or production checkpoint (.pt), e.g. checkpoints/NAME/best.pt")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; the server has "
                        "no authentication, so think twice before using 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help=f"requests generated together (default {defaults.max_batch_size})")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help=f"how long to wait for a batch to fill (default {defaults.max_wait_ms:g} ms)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens_limit,
                        help=f"the most tokens one request may ask for (default {defaults.max_new_tokens_limit})")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help=f"largest accepted request body (default {defaults.max_body_bytes})")
    parser.add_argument("--verbose", action="store_true", help="log every request")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    device = select_device(args.device)
    model, tokenizer, meta = load_model_from_checkpoint(args.checkpoint, device=device)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} holds no tokenizer, so prompts cannot be encoded; "
                         "use a checkpoint written by `python -m tiny_transformer train` or `export`")
    config = ServerConfig(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_new_tokens_limit=args.max_new_tokens, max_body_bytes=args.max_body_bytes,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this address can use the model",
              file=sys.stderr)
    with BatchGenerationServer(model, tokenizer, config) as batch_server:
        httpd = make_http_server(batch_server, args.host, args.port, verbose=args.verbose)
        step = meta.get("step")
        print(f"serving {args.checkpoint} ({model.num_parameters():,} parameters"
              f"{f', step {step}' if step is not None else ''}) on {device}", flush=True)
        print(f"listening on {httpd.url}  (POST /generate, GET /health; Ctrl-C stops)", flush=True)
        try:
            httpd.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            print("\nstopping", flush=True)
        finally:
            httpd.server_close()
    return 0
