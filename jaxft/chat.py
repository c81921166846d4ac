"""`python -m jaxft.chat`: one chat reply from a model (greedy, KV cache), through its own chat template.

    python -m jaxft.chat                                   # the embedded SmolLM2-135M-Instruct, a default question
    python -m jaxft.chat --model DIR_OR_GGUF --prompt "Why is the sky blue?" --max-new-tokens 128
    python -m jaxft.chat --adapter runs/quickstart/adapter  # with a peft LoRA adapter on top
"""

from __future__ import annotations

import argparse
import sys
import time

import jaxft
from jaxft import peft
from jaxft.errors import FileFormatError, JaxftError
from jaxft.generate.greedy import greedy_generate
from jaxft.runtime import keep_freed_host_memory


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxft.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="HF model directory, .gguf file, or smollm2-135m-instruct (default)")
    ap.add_argument("--adapter", default=None, help="a peft adapter directory to apply (LoRA, DoRA, IA3)")
    ap.add_argument("--prompt", default="In one sentence, what is fine-tuning a language model?",
                    help="the user message")
    ap.add_argument("--system", default=None, help="a system message (default: the template's own)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)

    keep_freed_host_memory()  # before anything starts JAX's threads (importing jax starts none)

    try:
        t0 = time.perf_counter()
        config, params = jaxft.load_pretrained(args.model)
        tokenizer = jaxft.load_tokenizer(args.model)
        if args.adapter:
            spec, adapter = peft.load_adapter(args.adapter, config)
            params = peft.bind(params, spec, adapter)
        if tokenizer.chat_template is None:
            raise FileFormatError(f"{args.model}: the tokenizer has no chat template; give a chat model")
    except (JaxftError, OSError, ValueError) as e:  # every input error is a JaxftError; the others a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] + ([config.eos_token_id] if isinstance(config.eos_token_id, int) else
                                      list(config.eos_token_id or ()))
    t1 = time.perf_counter()
    out = greedy_generate(config, params, [prompt], max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                          batch_size=1)[0]
    t2 = time.perf_counter()
    print(f"user: {args.prompt}")
    print(f"assistant: {tokenizer.decode(out, skip_special_tokens=True).strip()}")
    print(f"[{len(out)} tokens in {t2 - t1:.1f} s including compilation; model loaded in {t1 - t0:.1f} s]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
