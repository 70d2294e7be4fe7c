"""Decoding strategies: each takes a model, a cache and prompts and returns tokens plus stats."""
