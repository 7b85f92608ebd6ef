"""Replay: buffers, the sample store, the versioned vector index, routing and retrieval.

Works on vectors and bytes only (numpy, torch tensors, FAISS, SQLite); it never
sees a model and imports none of ``streamer``, ``learners`` or ``deploy``.
"""
