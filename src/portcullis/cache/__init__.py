"""Response caching and coalescing of identical requests (exact.py), their stores (store.py), and the
conversion of a cached answer to and from a stream (replay.py)."""
