"""`Scorer`: the engine as evaluation asks of it, through the public `LLM` API.

    scorer = Scorer(llm)
    scorer.encode(text) -> ids                  # as LLM.generate encodes a prompt (the tokenizer's bos)
    scorer.encode_pair(context, continuation) -> (context ids, continuation ids)
    scorer.check_fits(lengths, what)            # EvalInputError naming the item, before anything runs
    scorer.loglikelihoods([(ctx ids, cont ids)]) -> [(sum of logprobs, is_greedy)]
    scorer.prompt_logprobs([ids]) -> [[logprob of ids[i] given ids[:i] for i >= 1]]
    scorer.generate([prompt ids], stop, max_tokens) -> [text]   # greedy

Log-likelihoods are prompt logprobs (`SamplingParams(prompt_logprobs=...)`): the whole
context + continuation is one prompt, scored in one batched forward pass; the engine
generates one token after it, which is thrown away, so a scored sequence may be
`max_seq_len - 1` tokens long at most. Requests go to `LLM.generate` in groups, so that a
large dataset's per-token logprobs never sit in memory all at once.
A request the engine fails (NaN logits) fails the evaluation: a figure without it would
be wrong.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from trtllm.sampling_params import SamplingParams


class EvalInputError(ValueError):
    """Bad evaluation input (a dataset row, a length, an option): the command prints it as
    one line and exits 2."""


class Scorer:
    def __init__(self, llm, group_tokens: int = 1 << 16, progress: bool = False):
        if llm.tokenizer is None:
            raise EvalInputError("evaluation needs the model's tokenizer; this LLM was built without one")
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.limits = llm.limits
        # the longest scored sequence: a prompt, with one token generated after it
        self.max_len = min(self.limits.max_input_len, self.limits.max_seq_len - 1)
        self.group_tokens, self.progress = group_tokens, progress

    # -- tokens --------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special)

    def prefix_token(self) -> int:
        """The token a text starts from when nothing precedes it: bos, else eos (as lm-eval)."""
        for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if t is not None:
                return t
        raise EvalInputError("the tokenizer has neither a bos nor an eos token to start an empty context from")

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as the model reads them together: the whole
        is encoded, and the continuation is what follows the context's own encoding (so a
        merge across the boundary goes to the continuation). Trailing spaces of the context
        move to the continuation (lm-eval's rule). An empty context is the prefix token."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = self.encode(context) if context else []
        if not ctx:
            return [self.prefix_token()], self.encode(continuation, special=False)
        whole = self.encode(context + continuation)
        if whole[:len(ctx)] != ctx:  # the boundary merged: score the continuation on its own
            return ctx, self.encode(continuation, special=False)
        return ctx, whole[len(ctx):]

    def check_fits(self, lengths: Iterable[int], what: str, extra: int = 0) -> None:
        """EvalInputError naming the first item longer than the engine scores (`extra`:
        tokens to generate after it, else the one thrown away)."""
        lim = self.limits
        generated = max(extra, 1)
        limit = min(lim.max_input_len, lim.max_seq_len - generated)
        for i, n in enumerate(lengths):
            if n > limit:
                why = (f"max_input_len={lim.max_input_len}" if n > lim.max_input_len else
                       f"max_seq_len={lim.max_seq_len} with {generated} token{'s' if extra > 1 else ''} generated")
                raise EvalInputError(f"{what} {i} has {n} tokens, more than the engine takes ({why}); "
                                     "shorten it (fewer few-shot examples, a smaller window) or raise the limit")

    # -- scoring -------------------------------------------------------------------------
    def prompt_logprobs(self, prompts: list[list[int]], top: int = 0) -> Iterator[list[dict[int, float]]]:
        """Per prompt, per token after the first, {token: logprob, top alternatives...}."""
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top, detokenize=False)
        for outs in self._grouped(prompts, params, "scoring"):
            for out in outs:
                if out.error:
                    raise RuntimeError(f"the engine failed a scoring request: {out.error}")
                yield out.prompt_logprobs[1:]

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of the continuation's logprobs given the context, whether greedy decoding
        would produce it) per (context ids, continuation ids)."""
        self.check_fits((len(c) + len(x) for c, x in pairs), "request")
        results = []
        entries_of = self.prompt_logprobs([c + x for c, x in pairs], top=1)
        for (ctx, cont), entries in zip(pairs, entries_of):
            scored = entries[len(ctx) - 1:]
            total, greedy = 0.0, True
            for token, entry in zip(cont, scored):
                value = entry[token]
                total += value
                greedy = greedy and all(v <= value for v in entry.values())
            results.append((total, greedy))
        return results

    def generate(self, prompts: list[list[int]], stop: list[str], max_tokens: int) -> list[str]:
        """Greedy continuations, cut before the first stop string."""
        self.check_fits((len(p) for p in prompts), "prompt", extra=max_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
        texts = []
        for outs in self._grouped(prompts, params, "generating"):
            for out in outs:
                if out.error:
                    raise RuntimeError(f"the engine failed a generation request: {out.error}")
                texts.append(out.outputs[0].text)
        return texts

    def _grouped(self, prompts: list[list[int]], params: SamplingParams, desc: str) -> Iterator[list]:
        """LLM.generate over groups of about `group_tokens` prompt tokens (enough to fill many
        engine steps; few enough that their per-token results stay small)."""
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False)
        a = 0
        while a < len(prompts):
            b, tokens = a, 0
            while b < len(prompts) and (b == a or tokens + len(prompts[b]) <= self.group_tokens):
                tokens += len(prompts[b])
                b += 1
            yield self.llm.generate(prompts[a:b], params, use_tqdm=False)
            if bar is not None:
                bar.update(b - a)
            a = b
        if bar is not None:
            bar.close()
