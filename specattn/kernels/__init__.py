"""Attention kernels over the paged KV cache. Each kernel has a plain-PyTorch reference with the same
signature in `reference.py`; the reference is also the CPU path."""
