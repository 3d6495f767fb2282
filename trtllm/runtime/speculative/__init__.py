"""Speculative decoding: proposers (n-gram lookup, a draft model) and verification in the
target. config.py: the user's configs; ngram.py, draft_model.py: proposers; verify.py:
accept / reject; decoder.py: the engine's per-step glue; build.py: config -> decoder."""
