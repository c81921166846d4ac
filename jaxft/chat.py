"""`python -m jaxft.chat`: talk to a model through its own chat template, one reply or a multi-turn session.

    python -m jaxft.chat                                   # stdin a terminal: an interactive session, tokens streamed
    python -m jaxft.chat --prompt "Why is the sky blue?"   # one reply, then exit
    python -m jaxft.chat --model DIR_OR_GGUF --adapter runs/quickstart/adapter --temperature 0.7 --top-p 0.9
    python -m jaxft.chat --interactive < questions.txt     # one user turn per line, the conversation kept

In a session each turn reuses the KV cache of the turns before it (only the new messages are computed); an empty
line or end of input ends it, `/reset` starts a new conversation.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxft.errors import ConfigError, FileFormatError, JaxftError
from jaxft.generate.cli import add_model_flags, add_sampling_flags, build, sampling_from
from jaxft.generate.text import Chat
from jaxft.runtime import keep_freed_host_memory

DEFAULT_PROMPT = "In one sentence, what is fine-tuning a language model?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxft.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap)
    add_sampling_flags(ap)
    ap.add_argument("--prompt", default=None, help=f"one user message, answered once (default when stdin is not a "
                                                   f"terminal: {DEFAULT_PROMPT!r})")
    ap.add_argument("--system", default=None, help="a system message (default: the template's own)")
    ap.add_argument("--interactive", action="store_true", help="a session even when stdin is not a terminal")
    ap.set_defaults(max_new_tokens=96)
    args = ap.parse_args(argv)
    interactive = args.prompt is None and (args.interactive or sys.stdin.isatty())

    keep_freed_host_memory()  # before anything starts JAX's threads (importing jax starts none)

    try:
        t0 = time.perf_counter()
        engine, tokenizer = build(args, slots=1)
        if tokenizer.chat_template is None:
            raise FileFormatError(f"{args.model}: the tokenizer has no chat template; give a chat model")
        chat = Chat(engine, tokenizer, system=args.system, sampling=sampling_from(args),
                    max_new_tokens=args.max_new_tokens, stop=args.stop)
    except (JaxftError, OSError, ValueError) as e:  # every input error is a JaxftError; the others a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    if not interactive:
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
        try:
            reply = chat.send(prompt)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t2 = time.perf_counter()
        print(f"user: {prompt}")
        print(f"assistant: {reply}")
        print(f"[{len(chat.last.tokens)} tokens in {t2 - t1:.1f} s including compilation; model loaded in "
              f"{t1 - t0:.1f} s]", file=sys.stderr)
        return 0
    print(f"[model loaded in {t1 - t0:.1f} s; an empty line ends, /reset starts over]", file=sys.stderr)
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("user: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        if line.strip() == "/reset":
            chat.close()
            chat = Chat(engine, tokenizer, system=args.system, sampling=sampling_from(args),
                        max_new_tokens=args.max_new_tokens, stop=args.stop)
            continue
        if not tty:
            print(f"user: {line.strip()}")
        print("assistant: ", end="", flush=True)
        t = time.perf_counter()
        try:
            chat.send(line.strip(), on_text=lambda d: print(d, end="", flush=True))
        except ConfigError as e:  # e.g. the conversation outgrew --max-len: say so, keep the session
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print()
        print(f"[{len(chat.last.tokens)} tokens in {time.perf_counter() - t:.1f} s]", file=sys.stderr)
    chat.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
