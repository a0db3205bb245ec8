"""`python -m tiny_transformer export`: turn a training checkpoint into files other programs run.

    python -m tiny_transformer export --checkpoint checkpoints/NAME/best.pt --format llama2c --out model.bin \\
        --tokenizer-out tokenizer.bin            # for native/run.c
    python -m tiny_transformer export --checkpoint best.pt --format llama2c --quantize q8_0 --out model_q8.bin
    python -m tiny_transformer export --checkpoint best.pt --format llama2c --quantize q4_0 --out model_q4.bin
    python -m tiny_transformer export --checkpoint best.pt --format tokenizer --out tokenizer.bin
    python -m tiny_transformer export --checkpoint best.pt --format production --out model.pt [--dtype float16]
    python -m tiny_transformer export --checkpoint best.pt --format torchscript --out model.ts   # ids -> logits
    python -m tiny_transformer export --checkpoint best.pt --format onnx --out model.onnx       # needs onnx, onnxruntime
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("llama2c", "tokenizer", "production", "torchscript", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pt) written by `train`")
    parser.add_argument("--format", choices=FORMATS, default="llama2c",
                        help="llama2c: model.bin for native/run.c (default); tokenizer: llama2.c tokenizer.bin; "
                             "production: inference-only checkpoint; torchscript / onnx: a graph mapping token ids "
                             "to logits, checked against the model after writing")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--quantize", choices=["q8_0", "q4_0"], default=None,
                        help="llama2c: int8 weights (q8_0, about 3.6x smaller) or 4-bit weights (q4_0, about 6.4x "
                             "smaller), extended format; run.c multiplies them by int8 activations")
    parser.add_argument("--group-size", type=int, default=64,
                        help="llama2c with --quantize: weights per scale (default 64; halved until it fits)")
    parser.add_argument("--version", choices=["auto", "0", "ext"], default="auto",
                        help="llama2c: auto = llama2.c version 0 when the model fits it, else our extended format")
    parser.add_argument("--tokenizer-out", default=None,
                        help="llama2c: also write the checkpoint's SentencePiece tokenizer as tokenizer.bin here")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="production: store the weights in this type (default: as trained)")


def _write_tokenizer(tokenizer: dict | None, out: Path, source: str) -> Path:
    if not tokenizer:
        raise ValueError(f"{source} holds no tokenizer; export tokenizer.bin from the SentencePiece model with "
                         "tiny_transformer.sentencepiece_tools.export_tokenizer_bin('data/tok512.model', 'tokenizer.bin')")
    if tokenizer.get("type") != "sentencepiece":
        raise ValueError(f"the checkpoint's tokenizer is {tokenizer.get('type', 'char')!r}, but tokenizer.bin "
                         "holds a SentencePiece vocabulary; train with a SentencePiece tokenizer to run the model in C")
    from tiny_transformer.sentencepiece_tools import export_tokenizer_bin
    from tiny_transformer.tokenizers import tokenizer_from_dict

    return export_tokenizer_bin(tokenizer_from_dict(tokenizer), out)


def _export_graph(args: argparse.Namespace, out: Path) -> int:
    """TorchScript or ONNX: a graph of the model (ids -> logits) that runs without our library."""
    if args.quantize or args.tokenizer_out or args.dtype:
        raise ValueError(f"--quantize, --tokenizer-out and --dtype do not apply to --format {args.format}")
    from tiny_transformer import production
    from tiny_transformer.checkpoint import load_model_from_checkpoint

    model, _, _ = load_model_from_checkpoint(args.checkpoint)
    if args.format == "torchscript":
        info = production.export_torchscript(model, out)
        loader = "torch.jit.load"
    else:
        info = production.export_onnx(model, out)  # names the pip command when onnx is missing
        loader = "onnxruntime.InferenceSession"
    print(f"wrote {out}: {info['bytes'] / 1e6:.2f} MB, {args.format}; checked on a batch of shape "
          f"{tuple(info['check_shape'])}: max |difference| from the model {info['max_abs_diff']:.1e}")
    print(f"load it with {loader}({str(out)!r}); input: token ids (batch, time), output: logits")
    return 0


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.format == "production":
        from tiny_transformer.checkpoint import export_production

        info = export_production(args.checkpoint, out, dtype=args.dtype)
        print(f"wrote {out}: {info['production_bytes'] / 1e6:.2f} MB "
              f"({info['reduction']:.1f}x smaller than the training checkpoint)")
        return 0
    if args.format in ("torchscript", "onnx"):
        return _export_graph(args, out)

    from tiny_transformer.export import export_llama2c, model_from_checkpoint

    model, tokenizer = model_from_checkpoint(args.checkpoint)
    if args.format == "tokenizer":
        path = _write_tokenizer(tokenizer, out, args.checkpoint)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        return 0
    if args.quantize is None and args.group_size != 64:
        raise ValueError("--group-size only applies with --quantize q8_0 or q4_0")
    if args.tokenizer_out and Path(args.tokenizer_out).resolve() == out.resolve():
        raise ValueError("--tokenizer-out must differ from --out")
    version = {"auto": "auto", "0": 0, "ext": "ext"}[args.version]
    header = export_llama2c(model, out, version=version, quantize=args.quantize, group_size=args.group_size)
    kind = "llama2.c version 0" if header.version == 0 else "extended format version 1"
    weights = header.weight_type + (f", group size {header.group_size}" if header.group_size else "")
    print(f"wrote {out}: {kind}, {weights}, {header.file_size / 1e6:.2f} MB (dim {header.dim}, "
          f"{header.n_layers} layers, vocab {header.vocab_size}, context {header.seq_len})")
    if args.tokenizer_out:
        path = _write_tokenizer(tokenizer, Path(args.tokenizer_out), args.checkpoint)
        print(f"wrote {path}")
    print(f"run it: native/build/run {out} -z {args.tokenizer_out or 'tokenizer.bin'} -n 256 -i \"ROMEO:\" "
          "(build with: make -C native)")
    return 0
