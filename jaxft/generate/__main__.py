"""`python -m jaxft.generate`: completions for a file of prompts, JSONL out.

    python -m jaxft.generate --input prompts.txt                      # one prompt per line, raw text
    python -m jaxft.generate --input prompts.jsonl --output out.jsonl --temperature 0.7 --top-p 0.9
    echo '{"messages": [{"role": "user", "content": "Hi"}]}' | python -m jaxft.generate --adapter runs/x/adapter

Input (a file, or stdin with `--input -`, the default): one prompt per line, or JSON lines with "prompt" (raw
text, or put through the chat template with `--chat`) or "messages" (always through the chat template); a JSON
line may override "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed" and "stop". Output (stdout
or `--output`): one JSON line per input line, in order: "index", "completion", "finish_reason", "prompt_tokens",
"completion_tokens" (and "logprobs" with `--logprobs N`). Progress and a summary go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxft.errors import ConfigError, FileFormatError, JaxftError
from jaxft.generate.cli import add_model_flags, add_sampling_flags, build, sampling_from
from jaxft.generate.sampling import SamplingParams
from jaxft.generate.text import Request, render_chat, run
from jaxft.runtime import keep_freed_host_memory

_OVERRIDES = ("temperature", "top_k", "top_p", "min_p", "seed")


def read_requests(lines, where: str, tokenizer, defaults: SamplingParams, args) -> list[tuple[Request, int]]:
    """`(request, prompt_tokens)` per non-empty line; a bad line is a FileFormatError naming it."""
    out = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        at = f"{where}:{n}"
        item = {"prompt": line}
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise FileFormatError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
        if "messages" in item:
            if not isinstance(item["messages"], list) or not item["messages"]:
                raise FileFormatError(f"{at}: \"messages\" must be a non-empty list of {{role, content}}")
            ids = render_chat(tokenizer, item["messages"], at)
        elif isinstance(item.get("prompt"), str) and item["prompt"]:
            ids = (render_chat(tokenizer, [{"role": "user", "content": item["prompt"]}], at) if args.chat
                   else tokenizer(item["prompt"], add_special_tokens=False)["input_ids"])
        else:
            raise FileFormatError(f"{at}: a JSON line needs a non-empty \"prompt\" string or \"messages\"")
        if not ids:
            raise FileFormatError(f"{at}: the prompt encodes to no tokens")
        try:
            sampling = SamplingParams(**{**{k: getattr(defaults, k) for k in _OVERRIDES},
                                         **{k: item[k] for k in _OVERRIDES if k in item}})
        except ConfigError as e:
            raise ConfigError(f"{at}: {e}") from None
        max_new = item.get("max_new_tokens", args.max_new_tokens)
        stop = item.get("stop", args.stop)
        stop = [stop] if isinstance(stop, str) else list(stop)
        out.append((Request(ids, sampling, max_new, stop), len(ids)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxft.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap)
    add_sampling_flags(ap)
    ap.add_argument("--input", default="-", help="prompt file (text or JSONL); - for stdin (default)")
    ap.add_argument("--output", default="-", help="JSONL output file; - for stdout (default)")
    ap.add_argument("--chat", action="store_true", help="put plain prompts through the chat template as user turns")
    ap.add_argument("--batch-size", type=int, default=8, help="concurrent requests (engine slots)")
    ap.add_argument("--logprobs", type=int, default=None, help="report each token's logprob and the top N")
    args = ap.parse_args(argv)
    keep_freed_host_memory()

    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
        defaults = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
        t0 = time.perf_counter()
        engine, tokenizer = build(args, args.batch_size, -1 if args.logprobs is None else args.logprobs)
        if args.input == "-":
            requests = read_requests(sys.stdin, "<stdin>", tokenizer, defaults, args)
        else:
            try:
                with open(args.input, encoding="utf-8") as f:
                    requests = read_requests(f, args.input, tokenizer, defaults, args)
            except UnicodeDecodeError:
                raise FileFormatError(f"{args.input}: not UTF-8 text") from None
            except FileNotFoundError:
                raise FileFormatError(f"{args.input}: no such file; give a prompt file or - for stdin") from None
        if not requests:
            raise FileFormatError(f"{args.input if args.input != '-' else '<stdin>'}: no prompts (empty input)")
        t1 = time.perf_counter()
        print(f"[{len(requests)} prompts; model loaded in {t1 - t0:.1f} s]", file=sys.stderr)
        done = [0]

        def progress(i, out):
            done[0] += 1
            if done[0] % 10 == 0 or done[0] == len(requests):
                print(f"[{done[0]}/{len(requests)} done, {time.perf_counter() - t1:.1f} s]", file=sys.stderr)

        outs = run(engine, tokenizer, [r for r, _ in requests], on_done=progress)
        t2 = time.perf_counter()
    except (JaxftError, OSError, ValueError) as e:  # every input error is a JaxftError; the others a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
    sink = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for i, ((_, n_prompt), out) in enumerate(zip(requests, outs)):
            row = {"index": i, "completion": out.text, "finish_reason": out.finish, "prompt_tokens": n_prompt,
                   "completion_tokens": len(out.tokens)}
            if args.logprobs is not None:
                row["logprobs"] = [{"token": tokenizer.decode([t]), "logprob": lp,
                                    "top_logprobs": [{"token": tokenizer.decode([j]), "logprob": p} for j, p in top]
                                    if out.top_logprobs else []}
                                   for k, (t, lp) in enumerate(zip(out.tokens, out.logprobs or []))
                                   for top in [out.top_logprobs[k] if out.top_logprobs else []]]
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if sink is not sys.stdout:
            sink.close()
    total = sum(len(o.tokens) for o in outs)
    print(f"[{total} tokens for {len(outs)} prompts in {t2 - t1:.1f} s including compilation "
          f"({total / max(t2 - t1, 1e-9):.1f} tokens/s)]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
