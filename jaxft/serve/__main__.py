"""`python -m jaxft.serve --model PATH [--enable-lora] [--lora-modules NAME=DIR ...] [--max-loras N]
[--max-lora-rank R] [--max-model-len T] [--host H] [--port P]`: vLLM's flag names, OpenAI's API."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from jaxft.errors import JaxftError
from jaxft.serve.app import create_app
from jaxft.serve.server import ServeOptions, build


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=DIR (e.g. sql=adapters/sql)")
    return name, path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jaxft.serve", description=__doc__)
    ap.add_argument("--model", required=True, help="HF model directory or a model name jaxft knows")
    ap.add_argument("--served-model-name", default=None, help="the base model's name in requests (default: --model)")
    ap.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    ap.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[], metavar="NAME=DIR",
                    help="adapters to load at start (peft directories)")
    ap.add_argument("--max-loras", type=int, default=4, help="adapter slots (loaded adapters at once)")
    ap.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank the stack takes")
    ap.add_argument("--max-model-len", type=int, default=1024, help="prompt + completion tokens per request")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="rows decoded together")
    ap.add_argument("--max-logprobs", type=int, default=5, help="the most top_logprobs a request may ask")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = [n for n, _ in args.lora_modules]
    if len(set(names)) != len(names):
        print("error: --lora-modules names an adapter twice", file=sys.stderr)
        return 2
    opts = ServeOptions(args.model, args.enable_lora, dict(args.lora_modules), args.max_loras, args.max_lora_rank,
                        args.max_model_len, args.max_num_seqs, args.max_logprobs, args.served_model_name, args.seed)
    try:
        state = build(opts)
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state.scheduler.start()
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="info")
    finally:
        state.scheduler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
