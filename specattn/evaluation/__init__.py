"""Evaluation: perplexity, result files, accounting."""
