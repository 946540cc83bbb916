"""Spillway from Python: a ctypes binding of the C ABI (include/spillway.h).

No compiled extension: the package loads libSpillwayC.so (or libspillway.so) and calls it.
Buffers are passed without copies: anything exposing the writable buffer protocol (numpy
arrays, bytearray, memoryview) or a raw address (``ctypes.c_void_p``/int).

    import numpy as np, spillway
    with spillway.Store("spillway.toml") as store:
        pool = store.kv_pool(spillway.KVGeometry(tokens_per_block=16, layers=32, kv_heads=8,
                                                 head_dim=128, dtype_size=2), model_id="llama-3-8b")
        hashes = pool.block_hashes(tokens)
        matched = pool.lookup(hashes)
"""

from ._binding import (
    AcquiredLayer,
    Batch,
    KVGeometry,
    KVPool,
    LibraryNotFoundError,
    PAGE_CLASSES,
    PackedHashes,
    SpillwayError,
    Store,
    StoreTicket,
    Weights,
    inflight_stores,
    library_path,
    parent_id,
    version,
)

__all__ = ["AcquiredLayer", "Batch", "KVGeometry", "KVPool", "LibraryNotFoundError", "PAGE_CLASSES", "PackedHashes", "SpillwayError", "Store", "StoreTicket", "Weights", "inflight_stores", "library_path", "parent_id", "version"]
