"""Speculative decoding: proposers (n-gram lookup, a draft model, an EAGLE-3 head or
DeepSeek-V3's MTP layer) and verification in the target. config.py: the user's configs;
ngram.py, draft_model.py (+ eagle3.py: drafts that read the target's hidden states):
proposers; verify.py: accept / reject; decoder.py: the engine's per-step glue; build.py:
config -> decoder."""
