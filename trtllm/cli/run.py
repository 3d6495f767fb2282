"""`trtllm-run`: generate from the command line, tokens streamed to the terminal.

    trtllm-run "Once upon a time"                       # the built-in demo model
    trtllm-run --model ./Llama-3-8B "Hello" "Bonjour"   # several prompts, one after another
    echo "What is a fortune?" | trtllm-run --chat        # prompts from stdin, one a line
"""
from __future__ import annotations

import argparse
import sys

from trtllm.config import BuildConfig, KvCacheConfig


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="trtllm-run", description=__doc__.splitlines()[0])
    ap.add_argument("prompts", nargs="*", help="prompts (default: one per line of stdin)")
    ap.add_argument("--model", default=None, help="HF checkpoint directory (default: the built-in demo model)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--kv-cache-max-tokens", type=int, default=None)
    ap.add_argument("--no-cuda-graph", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    try:
        return _run(parse_args(argv))
    except KeyboardInterrupt:  # Ctrl-C: stop quietly (the LLM's `with` block has shut it down)
        print(file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from trtllm.runtime.llm import LLM
    from trtllm.runtime.llm_args import chat_params
    from trtllm.runtime.outputs import RequestError
    from trtllm.runtime.tokenizer import apply_chat_template
    from trtllm.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                seed=args.seed, stop=args.stop)
    except ValueError as e:
        print(f"trtllm-run: bad sampling option: {e}", file=sys.stderr)
        return 2
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("trtllm-run: no prompt given (as arguments or on stdin)", file=sys.stderr)
        return 2
    try:
        build = BuildConfig(max_batch_size=8, max_num_tokens=2048, max_seq_len=args.max_seq_len)
        kv = KvCacheConfig(max_tokens=args.kv_cache_max_tokens)
    except ValueError as e:
        print(f"trtllm-run: bad option: {e}", file=sys.stderr)
        return 2
    try:
        llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, build_config=build,
                  kv_cache_config=kv, enable_cuda_graph=not args.no_cuda_graph)
    except (OSError, ValueError) as e:
        print(f"trtllm-run: {e}", file=sys.stderr)
        return 1
    status = 0
    with llm:
        for prompt in prompts:
            try:  # refused when submitted (empty, too long, no chat template): said, and the next ones run
                text = apply_chat_template(llm.tokenizer, [{"role": "user", "content": prompt}]) if args.chat \
                    else prompt
                # a rendered chat holds the template's own BOS: not added again (LLM.chat's rule)
                stream = llm.generate(text, chat_params(params) if args.chat else params, streaming=True)
            except ValueError as e:
                print(f"trtllm-run: prompt {prompt!r}: {e}", file=sys.stderr)
                status = 1
                continue
            print(prompt, end="" if args.chat else "", flush=True)
            if args.chat:
                print()
            try:
                for last in stream:
                    print(last.outputs[0].text_diff, end="", flush=True)
                print()
            except RequestError as e:  # this prompt failed while it ran; the next ones still run
                print(f"\ntrtllm-run: {e}", file=sys.stderr)
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
