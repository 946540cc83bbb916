"""ctypes declarations for include/spillway.h and thin Python classes over them."""

from __future__ import annotations

import ctypes
import os
import queue
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Iterable, Optional

OK = 0
E_PARTIAL = 101
ERROR_NAMES = {
    1: "tier full", 2: "store full", 3: "page too large", 4: "unknown key", 5: "buffer too small",
    6: "checksum mismatch", 7: "tier I/O", 8: "page pinned", 9: "not pinned", 10: "closed",
    11: "invalid configuration", 12: "invalid argument", 13: "transport", 100: "invalid handle",
    101: "partial", 102: "not acquired",
}


class SpillwayError(Exception):
    """A failed call: ``status`` is the C status code, ``args[0]`` the library's message."""

    def __init__(self, status: int, message: str, count: Optional[int] = None):
        super().__init__(message)
        self.status = status
        self.count = count  # for partial batch results: blocks done from the start

    @property
    def name(self) -> str:
        return ERROR_NAMES.get(self.status, f"status {self.status}")


INSTALL_PREFIX = "/usr/local"  # tools/install-c-library.sh's default PREFIX


class LibraryNotFoundError(ImportError):
    """Neither $SPILLWAY_LIBRARY nor an installed libspillway.so was found."""


def _installed_library() -> Optional[str]:
    """The libspillway.so tools/install-c-library.sh installs (PREFIX/lib/libspillway.so, PREFIX
    from $SPILLWAY_PREFIX, default /usr/local), or one the dynamic loader finds by name
    (LD_LIBRARY_PATH, the ldconfig cache)."""
    prefix = os.environ.get("SPILLWAY_PREFIX") or INSTALL_PREFIX
    candidate = Path(prefix) / "lib" / "libspillway.so"
    if candidate.is_file():
        return str(candidate)
    try:
        ctypes.CDLL("libspillway.so")
    except OSError:
        return None
    return "libspillway.so"


def library_path() -> str:
    """Where the C library is, in this order: $SPILLWAY_LIBRARY (a libSpillwayC.so, e.g. a
    checkout's .build/release/libSpillwayC.so), then the libspillway.so that
    tools/install-c-library.sh installs (PREFIX/lib, PREFIX = $SPILLWAY_PREFIX or
    /usr/local; or found by the dynamic loader). Raises LibraryNotFoundError saying how to
    build or install it when there is neither."""
    explicit = os.environ.get("SPILLWAY_LIBRARY")
    if explicit:
        if not Path(explicit).is_file():
            raise LibraryNotFoundError(f"SPILLWAY_LIBRARY={explicit} does not exist; build it with "
                                       "`swift build -c release --product SpillwayC` in a Spillway checkout "
                                       "(it writes .build/release/libSpillwayC.so)")
        return explicit
    installed = _installed_library()
    if installed:
        return installed
    prefix = os.environ.get("SPILLWAY_PREFIX") or INSTALL_PREFIX
    raise LibraryNotFoundError(
        "Spillway's C library was not found: SPILLWAY_LIBRARY is not set and there is no installed "
        f"libspillway.so ({prefix}/lib, nor on the dynamic loader's path). In a Spillway checkout, either "
        "build it with `swift build -c release --product SpillwayC` and set "
        "SPILLWAY_LIBRARY=$PWD/.build/release/libSpillwayC.so, or install it with "
        "`tools/install-c-library.sh [PREFIX]` (PREFIX/lib/libspillway.so; set SPILLWAY_PREFIX for a PREFIX "
        "other than /usr/local).")


_lib = ctypes.CDLL(library_path())
_u64 = ctypes.c_uint64
_size = ctypes.c_size_t
_status = ctypes.c_int32
_p = ctypes.c_void_p


class _Geometry(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("tokens_per_block", "layers", "kv_heads", "head_dim", "dtype_size", "layout")]


def _declare(name, *argtypes):
    function = getattr(_lib, name)
    function.argtypes = list(argtypes)
    function.restype = _status
    return function


_lib.spillway_version.restype = ctypes.c_char_p
_lib.spillway_version.argtypes = []
_lib.spillway_last_error.restype = ctypes.c_char_p
_lib.spillway_last_error.argtypes = []
_store_open = _declare("spillway_store_open", ctypes.c_char_p, ctypes.POINTER(_u64))
_store_close = _declare("spillway_store_close", _u64)
_store_put = _declare("spillway_store_put", _u64, ctypes.c_char_p, _p, _size)
_store_put_hinted = _declare("spillway_store_put_hinted", _u64, ctypes.c_char_p, _p, _size, ctypes.c_uint32, ctypes.c_uint32,
                             ctypes.c_char_p)
_store_page_hints = _declare("spillway_store_page_hints", _u64, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32),
                             ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64))
_lib.spillway_parent_id.restype = ctypes.c_uint64
_lib.spillway_parent_id.argtypes = [ctypes.c_char_p]
# Page classes (SPILLWAY_PAGE_* in spillway.h), by the names Python callers use.
PAGE_CLASSES = {"generic": 0, "kv_block": 1, "weights": 2}
_store_get = _declare("spillway_store_get", _u64, ctypes.c_char_p, _p, _size, ctypes.POINTER(_size))
_store_remove = _declare("spillway_store_remove", _u64, ctypes.c_char_p)
_store_stats = _declare("spillway_store_stats_json", _u64, ctypes.c_char_p, _size, ctypes.POINTER(_size))
_pool_create = _declare("spillway_kv_pool_create", _u64, ctypes.POINTER(_Geometry), ctypes.c_char_p, ctypes.POINTER(_u64))
_pool_destroy = _declare("spillway_kv_pool_destroy", _u64)
_block_sizes = _declare("spillway_kv_block_sizes", _u64, ctypes.POINTER(_size), ctypes.POINTER(_size))
_block_hashes = _declare("spillway_kv_block_hashes", _u64, ctypes.POINTER(ctypes.c_uint32), _size, ctypes.c_char_p, _size,
                         ctypes.POINTER(_size))
_lookup = _declare("spillway_kv_lookup", _u64, ctypes.c_char_p, _size, ctypes.POINTER(_size))
_kv_store = _declare("spillway_kv_store", _u64, ctypes.c_char_p, _size, ctypes.c_int32, ctypes.POINTER(_p), _size, ctypes.POINTER(_size))
_kv_store_async = _declare("spillway_kv_store_async", _u64, ctypes.c_char_p, _size, ctypes.c_int32, ctypes.POINTER(_p), _size,
                           ctypes.POINTER(_u64))
_kv_wait = _declare("spillway_kv_wait", _u64, ctypes.POINTER(_size))
_kv_load = _declare("spillway_kv_load", _u64, ctypes.c_char_p, _size, ctypes.c_int32, ctypes.POINTER(_p), _size, ctypes.POINTER(_size))
_kv_store_array = _declare("spillway_kv_store_array", _u64, ctypes.c_char_p, _size, ctypes.c_int32, ctypes.c_int32, _p,
                           ctypes.c_ssize_t, ctypes.c_ssize_t, _size, ctypes.POINTER(_size))
_kv_store_array_async = _declare("spillway_kv_store_array_async", _u64, ctypes.c_char_p, _size, ctypes.c_int32, ctypes.c_int32, _p,
                                 ctypes.c_ssize_t, ctypes.c_ssize_t, _size, ctypes.POINTER(_u64))
_kv_load_array = _declare("spillway_kv_load_array", _u64, ctypes.c_char_p, _size, ctypes.c_int32, ctypes.c_int32, _p,
                          ctypes.c_ssize_t, ctypes.c_ssize_t, _size, ctypes.POINTER(_size))
class _PageIO(ctypes.Structure):
    _fields_ = [("key", ctypes.c_uint8 * 16), ("buffer", _p), ("length", _size), ("status", ctypes.c_int32),
                ("latency_ns", ctypes.c_uint64)]


_store_submit_get = _declare("spillway_store_submit_get", _u64, ctypes.POINTER(_PageIO), _size, ctypes.c_uint32, _p, _p,
                             ctypes.POINTER(_u64))
_store_submit_put = _declare("spillway_store_submit_put", _u64, ctypes.POINTER(_PageIO), _size, ctypes.c_uint32, _p, _p,
                             ctypes.POINTER(_u64))
_batch_wait = _declare("spillway_batch_wait", _u64, ctypes.c_double, ctypes.POINTER(_size))
_kv_prefetch = _declare("spillway_kv_prefetch", _u64, ctypes.c_char_p, _size)
_kv_pin = _declare("spillway_kv_pin", _u64, ctypes.c_char_p, _size)
_kv_unpin = _declare("spillway_kv_unpin", _u64, ctypes.c_char_p, _size)
_kv_evict = _declare("spillway_kv_evict", _u64, ctypes.c_char_p, _size, ctypes.POINTER(_size))


class _TensorView(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_char_p), ("data", _p), ("bytes", _size)]


_weights_register = _declare("spillway_weights_register", _u64, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32, _size,
                             ctypes.c_uint32, ctypes.POINTER(_u64))
_weights_layers = _declare("spillway_weights_layers", _u64, ctypes.POINTER(ctypes.c_int32), _size, ctypes.POINTER(_size))
_weights_acquire = _declare("spillway_weights_acquire", _u64, ctypes.c_int32, ctypes.POINTER(_TensorView), _size, ctypes.POINTER(_size))
_weights_release = _declare("spillway_weights_release", _u64, ctypes.c_int32)
_weights_stall = _declare("spillway_weights_stall", _u64, ctypes.POINTER(ctypes.c_uint64))
_weights_destroy = _declare("spillway_weights_destroy", _u64)


def parent_id(key) -> int:
    """The 64-bit id ``Store.page_hints`` reports for a KV block's parent key."""
    return _lib.spillway_parent_id(_key(key))


def version() -> str:
    return _lib.spillway_version().decode()


def _check(status: int, count: Optional[int] = None) -> None:
    if status != OK:
        raise SpillwayError(status, _lib.spillway_last_error().decode(errors="replace"), count)


def _key(key) -> bytes:
    """A 16-byte key from bytes, or an int (the 128-bit value)."""
    if isinstance(key, int):
        if not 0 <= key < 1 << 128:
            raise ValueError("a key is a 128-bit unsigned integer")
        return key.to_bytes(16, "big")
    key = bytes(key)
    if len(key) != 16:
        raise ValueError("a key is 16 bytes")
    return key


class _Buffer:
    """An address and size for a buffer-protocol object (kept alive by this object) or an
    explicit (address, size) pair."""

    def __init__(self, obj, writable: bool):
        self.keep = obj
        if isinstance(obj, tuple):
            address, size = obj
            self.address, self.size = int(address.value if isinstance(address, ctypes.c_void_p) else address), int(size)
            return
        view = memoryview(obj)
        if writable and view.readonly:
            raise ValueError("a load needs a writable buffer")
        if not view.c_contiguous:
            raise ValueError("buffers must be C-contiguous")
        self.size = view.nbytes
        if view.readonly:
            # Read-only bytes: ctypes cannot take their address, so copy once.
            self.keep = ctypes.create_string_buffer(view.tobytes(), self.size)
            self.address = ctypes.addressof(self.keep)
        else:
            carrier = (ctypes.c_char * self.size).from_buffer(view.cast("B"))
            self.keep = (obj, carrier)
            self.address = ctypes.addressof(carrier)


def _buffers(objects: Sequence, writable: bool):
    wrapped = [_Buffer(obj, writable) for obj in objects]
    sizes = {buffer.size for buffer in wrapped}
    if len(sizes) > 1:
        raise ValueError("all buffers of a call must have the same size")
    array = (_p * max(1, len(wrapped)))(*[buffer.address for buffer in wrapped])
    return wrapped, array, (sizes.pop() if sizes else 0)


class PackedHashes(Sequence):
    """Block hashes packed once (16 bytes each, back to back) for repeated calls: a sequence of
    16-byte hashes that the pool passes to the library without re-packing. Slicing gives
    PackedHashes. ``KVPool.pack(hashes)`` or ``KVPool.block_hashes(tokens, packed=True)``."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        if len(data) % 16:
            raise ValueError("packed hashes are 16 bytes each")
        self.data = bytes(data)

    def __len__(self) -> int:
        return len(self.data) // 16

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return PackedHashes(self.data[16 * start: 16 * max(start, stop)])
            return PackedHashes(b"".join(self.data[16 * i: 16 * i + 16] for i in range(start, stop, step)))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("hash index out of range")
        return self.data[16 * index: 16 * index + 16]

    def __eq__(self, other):
        if isinstance(other, PackedHashes):
            return self.data == other.data
        return NotImplemented

    def __hash__(self):
        return hash(self.data)

    def __repr__(self):
        return f"PackedHashes({len(self)} blocks)"


def _array_layout(array, blocks: int, layer_bytes: int, per_layer: bool, writable: bool):
    """(address, layer count, layer stride, block stride) of a [layers, blocks, ...] array (or
    with ``per_layer`` a [blocks, ...] one), read from its ``__array_interface__``: no copy.
    The dimensions after the block axis must be C-contiguous and hold exactly ``layer_bytes``."""
    interface = getattr(array, "__array_interface__", None)
    if not isinstance(interface, dict):
        raise ValueError(f"expected a numpy array (an object with __array_interface__), got {type(array).__name__}")
    typestr = interface["typestr"]
    if typestr[1] == "O":
        raise ValueError("an object array holds Python references, not KV bytes")
    digits = "".join(itertools.takewhile(str.isdigit, typestr[2:]))
    itemsize = int(digits or 0)
    if itemsize <= 0:
        raise ValueError(f"unsupported dtype {typestr!r}")
    data = interface.get("data")
    if not isinstance(data, tuple):
        raise ValueError("the array does not expose its address (__array_interface__ without a data pointer)")
    address, readonly = data
    if writable and readonly:
        raise ValueError("a load needs a writable array (this one is read-only)")
    shape = tuple(interface["shape"])
    lead = 1 if per_layer else 2
    expected = "[blocks, ...]" if per_layer else "[layers, blocks, ...]"
    if len(shape) < lead:
        raise ValueError(f"expected a {expected} array, got shape {shape}")
    strides = interface.get("strides")
    if strides is None:  # C-contiguous
        strides, step = [], itemsize
        for extent in reversed(shape):
            strides.append(step)
            step *= extent
        strides = tuple(reversed(strides))
    slice_bytes, step = itemsize, itemsize
    for axis in range(len(shape) - 1, lead - 1, -1):
        if shape[axis] != 1 and strides[axis] != step:
            raise ValueError(f"the dimensions after the block axis must be C-contiguous (shape {shape}, strides {strides}); "
                             "take a contiguous copy or reshape so each layer slice of a block is one run of bytes")
        step *= shape[axis]
        slice_bytes *= shape[axis]
    if slice_bytes != layer_bytes:
        raise ValueError(f"each block's layer slice of this array has {slice_bytes} bytes (shape {shape}, "
                         f"{itemsize}-byte items); the pool's geometry needs {layer_bytes}")
    block_axis = lead - 1
    if shape[block_axis] != blocks:
        raise ValueError(f"the array holds {shape[block_axis]} blocks (axis {block_axis} of shape {shape}) "
                         f"but {blocks} hashes were given")
    layers = 1 if per_layer else shape[0]
    layer_stride = 0 if per_layer or layers == 1 else strides[0]
    block_stride = 0 if blocks == 1 else strides[block_axis]
    if layer_stride < 0 or block_stride < 0:
        raise ValueError(f"negative strides {strides} (a reversed view): pass a forward view or a copy")
    if layers == 0 and blocks > 0:
        raise ValueError(f"the array holds no layers (shape {shape})")
    return address, layers, layer_stride, block_stride


@dataclass(frozen=True)
class KVGeometry:
    """K and V of tokens_per_block × kv_heads × head_dim elements of dtype_size bytes per layer."""

    tokens_per_block: int
    layers: int
    kv_heads: int
    head_dim: int
    dtype_size: int = 2
    layout: str = "per-layer"  # or "whole-block"

    @property
    def layer_bytes(self) -> int:
        return 2 * self.tokens_per_block * self.kv_heads * self.head_dim * self.dtype_size

    @property
    def block_bytes(self) -> int:
        return self.layers * self.layer_bytes


class Store:
    """A tiered store (a TOML configuration file, or with None the library default: device → DRAM → NVMe, no sockets)."""

    def __init__(self, config_path: Optional[str] = None):
        handle = _u64(0)
        _check(_store_open(config_path.encode() if config_path else None, ctypes.byref(handle)))
        self.handle = handle.value
        # Weights registered here, held strongly: the library frees their layers' memory when
        # the store closes, so close() must reach every outstanding view even if the caller
        # dropped the Weights object.
        self._weights: list[Weights] = []

    def close(self) -> None:
        """Closes the store and everything on it. Views of acquired weight layers are
        invalidated first (closing frees their memory); if one still has a buffer export,
        this raises BufferError and leaves the store open."""
        if self.handle:
            for weights in list(self._weights):
                weights._invalidate_all()
            handle, self.handle = self.handle, 0
            self._weights.clear()
            _check(_store_close(handle))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def put(self, key, data, page_class="generic", order=0, parent=None) -> None:
        """Stores ``data`` under ``key``. ``page_class`` ("generic", "kv_block", "weights")
        and its hints (``order``: a KV block's depth or a weights layer's streaming position;
        ``parent``: a KV block's parent key) inform the store's placement policy."""
        buffer = _Buffer(data, writable=False)
        if page_class == "generic" and order == 0 and parent is None:
            _check(_store_put(self.handle, _key(key), buffer.address, buffer.size))
            return
        if page_class not in PAGE_CLASSES:
            raise ValueError(f"unknown page class {page_class!r} (available: {', '.join(PAGE_CLASSES)})")
        if not 0 <= order < 1 << 32:
            raise ValueError("order is a 32-bit unsigned integer (stored saturated at 65535)")
        _check(_store_put_hinted(self.handle, _key(key), buffer.address, buffer.size, PAGE_CLASSES[page_class], order,
                                 None if parent is None else _key(parent)))

    def page_hints(self, key) -> dict:
        """The class and hints a stored page carries: ``{"page_class", "order", "parent_id"}``."""
        page_class, order, digest = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint64()
        _check(_store_page_hints(self.handle, _key(key), ctypes.byref(page_class), ctypes.byref(order), ctypes.byref(digest)))
        name = next(name for name, value in PAGE_CLASSES.items() if value == page_class.value)
        return {"page_class": name, "order": order.value, "parent_id": digest.value}

    def get(self, key, into=None) -> bytes | int:
        """With ``into`` (a writable buffer): fills it, returns the page length. Without:
        returns the page as bytes."""
        length = _size(0)
        if into is not None:
            buffer = _Buffer(into, writable=True)
            _check(_store_get(self.handle, _key(key), buffer.address, buffer.size, ctypes.byref(length)))
            return length.value
        # One get for pages up to 64 KiB (a size query first would count, and promote, every
        # page twice); a larger page is asked again with the size the library reported, and
        # again if it grew in between (an overwrite racing this read).
        capacity = 64 << 10
        for _ in range(8):
            out = ctypes.create_string_buffer(capacity)
            status = _store_get(self.handle, _key(key), out, capacity, ctypes.byref(length))
            if status != 5:  # 5: buffer too small, length tells the size
                _check(status)
                return out.raw[: length.value]
            capacity = max(1, length.value)
        _check(status)

    def submit_put(self, keys: Sequence, pages: Sequence, queue_depth: int = 0) -> "Batch":
        """Submits the writes of ``pages`` (buffer-protocol objects) under ``keys`` and returns
        at once; ``Batch.wait()`` says how many succeeded. The pages must not change until then."""
        return self._submit(_store_submit_put, keys, [_Buffer(page, writable=False) for page in pages], queue_depth)

    def submit_get(self, keys: Sequence, buffers: Sequence, queue_depth: int = 0) -> "Batch":
        """Submits reads of ``keys`` into ``buffers`` (writable) and returns at once;
        ``Batch.wait()`` says how many succeeded, ``Batch.lengths``/``statuses`` each page's."""
        return self._submit(_store_submit_get, keys, [_Buffer(buffer, writable=True) for buffer in buffers], queue_depth)

    def _submit(self, function, keys, buffers, queue_depth) -> "Batch":
        keys = [_key(key) for key in keys]
        if len(keys) != len(buffers) or not keys:
            raise ValueError("give one buffer per key, at least one")
        ios = (_PageIO * len(keys))()
        for io, key, buffer in zip(ios, keys, buffers):
            ctypes.memmove(io.key, key, 16)
            io.buffer = buffer.address
            io.length = buffer.size
        ticket = _u64(0)
        _check(function(self.handle, ios, len(keys), queue_depth, None, None, ctypes.byref(ticket)))
        return Batch(ticket.value, ios, buffers)

    def remove(self, key) -> None:
        _check(_store_remove(self.handle, _key(key)))

    def stats(self) -> dict:
        import json

        # The document can grow between the size query and the read (uptime, counters gain
        # digits), so ask with room to spare and retry with the size the library reports.
        length = _size(0)
        status = _store_stats(self.handle, None, 0, ctypes.byref(length))
        for _ in range(8):
            if status not in (OK, 5):
                break
            out = ctypes.create_string_buffer(length.value + 256)
            status = _store_stats(self.handle, out, length.value + 256, ctypes.byref(length))
            if status == OK:
                return json.loads(out.value.decode())
        _check(status)
        raise SpillwayError(5, "the statistics kept growing faster than they could be read")

    def kv_pool(self, geometry: KVGeometry, model_id: str) -> "KVPool":
        return KVPool(self, geometry, model_id)

    def register_weights(self, path: str, model_id: str, device_budget: int, prefetch: int = 2,
                         tier: Optional[int] = None) -> "Weights":
        weights = Weights(self, path, model_id, device_budget, prefetch, tier)
        self._weights.append(weights)
        return weights


class Batch:
    """A submitted batch (``Store.submit_get``/``submit_put``). Keeps its buffers alive until
    waited for; wait exactly once (a second wait raises)."""

    def __init__(self, ticket: int, ios, buffers):
        self._ticket, self._ios, self._buffers = ticket, ios, buffers
        self.succeeded: Optional[int] = None

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits (at most ``timeout`` seconds; None: however long) and returns how many
        pages succeeded; raises ``SpillwayError`` (status 103) if still running at the
        timeout, when the batch may be waited for again."""
        succeeded = _size(0)
        status = _batch_wait(self._ticket, -1.0 if timeout is None else float(timeout), ctypes.byref(succeeded))
        if status not in (OK, 101):  # 101: some pages failed, see statuses
            _check(status)
        self.succeeded = succeeded.value
        return self.succeeded

    def __del__(self):
        # Dropped without wait(): the batch may still be writing into (or reading from) the
        # buffers this object keeps alive, so wait for it before letting them go.
        if getattr(self, "succeeded", 0) is None:
            _batch_wait(self._ticket, -1.0, ctypes.byref(_size(0)))

    @property
    def statuses(self) -> list[int]:
        return [io.status for io in self._ios]

    @property
    def lengths(self) -> list[int]:
        return [io.length for io in self._ios]

    @property
    def latencies_ns(self) -> list[int]:
        return [io.latency_ns for io in self._ios]


class AcquiredLayer(dict):
    """One acquisition of a layer: ``{tensor name: memoryview}`` over the library's device
    memory, without a copy. The views are valid until this acquisition is released
    (``release()``, ``Weights.release(layer)``, or leaving a ``with`` block), or the weights or
    their store close: then they are released (``memoryview.release()``), so any later use
    raises ValueError ("operation forbidden on released memoryview object") instead of
    reading memory the library has reused or freed.

    Only these memoryviews are invalidated. Objects made from them that keep their own
    reference to the memory (``numpy.frombuffer(view)``, ``memoryview(view)``, slices) are
    not, and must not be used after the release; copy what must outlive the acquisition
    (``numpy.array(view)``, ``bytes(view)``, or ``Weights.read_layer``). If something still
    holds a buffer export on a view (a C extension's Py_buffer), releasing raises BufferError
    and the layer stays acquired, its memory valid."""

    def __init__(self, weights: "Weights", layer: int, views: dict):
        super().__init__(views)
        self.weights = weights
        self.layer = layer
        self._bases: list[memoryview] = []
        self.released = False

    def _invalidate(self) -> None:
        # BufferError (a live export) propagates before the library gets the layer back.
        for view in self.values():
            view.release()
        for base in self._bases:
            base.release()

    def release(self) -> None:
        self.weights._release(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.released:
            self.release()


class Weights:
    """A safetensors model registered in the store, streamed layer by layer into a device
    budget with ``prefetch`` layers loading ahead. ``acquire(layer)`` returns an
    ``AcquiredLayer`` (``{name: memoryview}``) valid until it is released; layer -1 holds
    shared tensors. Acquire and release pair up: releasing a layer not held is a
    SpillwayError ("not acquired")."""

    def __init__(self, store: Store, path: str, model_id: str, device_budget: int, prefetch: int, tier: Optional[int]):
        handle = _u64(0)
        _check(_weights_register(store.handle, path.encode(), model_id.encode(), -1 if tier is None else tier, device_budget,
                                 prefetch, ctypes.byref(handle)))
        self.owner = store
        self.handle = handle.value
        self._acquired: dict[int, list[AcquiredLayer]] = {}  # outstanding acquisitions, oldest first

    def layers(self) -> list[int]:
        count = _size(0)
        _weights_layers(self.handle, None, 0, ctypes.byref(count))
        out = (ctypes.c_int32 * max(1, count.value))()
        _check(_weights_layers(self.handle, out, count.value, ctypes.byref(count)))
        return list(out[: count.value])

    def acquire(self, layer: int) -> AcquiredLayer:
        count = _size(0)
        views = (_TensorView * 64)()
        status = _weights_acquire(self.handle, layer, views, 64, ctypes.byref(count))
        if status == 5:  # more than 64 tensors in the layer
            views = (_TensorView * count.value)()
            status = _weights_acquire(self.handle, layer, views, count.value, ctypes.byref(count))
        _check(status)
        tensors, bases = {}, []
        for view in views[: count.value]:
            base = memoryview((ctypes.c_char * view.bytes).from_address(view.data or 0))
            bases.append(base)
            tensors[view.name.decode()] = base.cast("B")
        acquired = AcquiredLayer(self, layer, tensors)
        acquired._bases = bases
        self._acquired.setdefault(layer, []).append(acquired)
        return acquired

    def read_layer(self, layer: int) -> dict:
        """The layer's tensors copied out: ``{name: bytes}``, no acquisition left behind."""
        with self.acquire(layer) as views:
            return {name: bytes(view) for name, view in views.items()}

    def release(self, layer: int) -> None:
        """Releases the oldest outstanding acquisition of ``layer`` (its views become
        unusable). With none outstanding, the library refuses: SpillwayError "not acquired"."""
        pending = self._acquired.get(layer)
        if not pending:
            _check(_weights_release(self.handle, layer))  # refused by the library: not acquired
            return
        self._release(pending[0])

    def _release(self, acquired: AcquiredLayer) -> None:
        if acquired.released:
            raise SpillwayError(102, f"not acquired: this acquisition of layer {acquired.layer} was already released")
        # Views first: once the library has the layer back it may reuse the memory.
        acquired._invalidate()
        acquired.released = True
        self._acquired[acquired.layer].remove(acquired)
        _check(_weights_release(self.handle, acquired.layer))

    def _invalidate_all(self) -> None:
        for pending in self._acquired.values():
            for acquired in pending:
                acquired._invalidate()
                acquired.released = True
        self._acquired.clear()

    def stall_seconds(self) -> float:
        value = ctypes.c_uint64(0)
        _check(_weights_stall(self.handle, ctypes.byref(value)))
        return value.value / 1e9

    def close(self) -> None:
        """Unregisters the model; outstanding views are invalidated first (BufferError, and
        nothing closed, if one still has a buffer export)."""
        if self.handle:
            self._invalidate_all()
            handle, self.handle = self.handle, 0
            if self in self.owner._weights:
                self.owner._weights.remove(self)
            _check(_weights_destroy(handle))


# Buffers of asynchronous stores in flight, by ticket handle. The library reads them until
# the store completes, whether or not anybody waits, so they live here (not only on the
# StoreTicket) until spillway_kv_wait has returned for that ticket.
_inflight: dict[int, object] = {}
_inflight_lock = threading.RLock()  # reentrant: __del__ (garbage collection) may run while held
# Tickets dropped without wait(): a daemon thread waits for them, then lets their buffers go.
# (Waiting in __del__ itself would block whatever thread the garbage collector ran on.)
_orphans: "queue.Queue[int]" = queue.Queue()
_reaper: Optional[threading.Thread] = None


def _forget(handle: int) -> None:
    with _inflight_lock:
        _inflight.pop(handle, None)


def _reap() -> None:
    while True:
        handle = _orphans.get()
        stored = _size(0)
        _kv_wait(handle, ctypes.byref(stored))  # nobody to report to: the ticket was dropped
        _forget(handle)
        _orphans.task_done()


def _adopt(handle: int) -> None:
    global _reaper
    with _inflight_lock:
        if _reaper is None:
            _reaper = threading.Thread(target=_reap, name="spillway-ticket-reaper", daemon=True)
            _reaper.start()
    _orphans.put(handle)


def inflight_stores() -> int:
    """Asynchronous stores whose buffers the binding still keeps alive (waited or not)."""
    with _inflight_lock:
        return len(_inflight)


class StoreTicket:
    """An asynchronous KV store in flight; ``wait()`` returns the blocks stored (from the start).
    The buffers stay referenced until the store completes, even if the ticket is dropped
    without ``wait()`` (then a background thread waits for it); they must stay unchanged."""

    def __init__(self, handle: int, keep):
        self.handle = handle
        self._waited = False
        with _inflight_lock:
            _inflight[handle] = keep

    def wait(self) -> int:
        stored = _size(0)
        status = _kv_wait(self.handle, ctypes.byref(stored))
        if not self._waited:
            self._waited = True
            _forget(self.handle)
        _check(status, stored.value)
        return stored.value

    def __del__(self):
        # getattr: __init__ may not have run to the end; _adopt may be gone at interpreter exit.
        if not getattr(self, "_waited", True) and _adopt is not None:
            _adopt(self.handle)


class KVPool:
    """A KV-cache block pool: chained prefix hashes, lookup, store/load per layer or whole."""

    def __init__(self, store: Store, geometry: KVGeometry, model_id: str):
        if geometry.layout not in ("per-layer", "whole-block"):
            raise ValueError("layout is 'per-layer' or 'whole-block'")
        self.owner = store  # keeps the store object alive as long as the pool
        self.geometry = geometry
        raw = _Geometry(geometry.tokens_per_block, geometry.layers, geometry.kv_heads, geometry.head_dim, geometry.dtype_size,
                        0 if geometry.layout == "per-layer" else 1)
        handle = _u64(0)
        _check(_pool_create(store.handle, ctypes.byref(raw), model_id.encode(), ctypes.byref(handle)))
        self.handle = handle.value

    def close(self) -> None:
        if self.handle:
            handle, self.handle = self.handle, 0
            _check(_pool_destroy(handle))

    def block_hashes(self, tokens: Iterable[int], packed: bool = False):
        """The 16-byte chained hashes of every full block of ``tokens``: a list of bytes, or
        with ``packed`` one PackedHashes (what repeated calls on the same blocks should pass)."""
        tokens = list(tokens)
        array = (ctypes.c_uint32 * max(1, len(tokens)))(*tokens)
        capacity = len(tokens) // self.geometry.tokens_per_block
        out = ctypes.create_string_buffer(max(1, 16 * capacity))
        blocks = _size(0)
        _check(_block_hashes(self.handle, array, len(tokens), out, capacity, ctypes.byref(blocks)))
        if packed:
            return PackedHashes(out.raw[: 16 * blocks.value])
        return [out.raw[16 * i: 16 * i + 16] for i in range(blocks.value)]

    @staticmethod
    def pack(hashes: Sequence) -> PackedHashes:
        """Hashes (16-byte keys or 128-bit ints) packed once for repeated calls."""
        return hashes if isinstance(hashes, PackedHashes) else PackedHashes(b"".join(_key(h) for h in hashes))

    @staticmethod
    def _hashes(hashes: Sequence[bytes]) -> bytes:
        if isinstance(hashes, PackedHashes):
            return hashes.data
        return b"".join(_key(h) for h in hashes)

    def _array_call(self, hashes, array, layer, first_layer, writable):
        per_layer = layer is not None
        address, layers, layer_stride, block_stride = _array_layout(array, len(hashes), self.geometry.layer_bytes, per_layer,
                                                                    writable)
        first = layer if per_layer else first_layer
        if not 0 <= first or first + layers > self.geometry.layers:
            raise ValueError(f"layers {first}..{first + layers - 1} are outside the geometry's 0..{self.geometry.layers - 1}")
        return self._hashes(hashes), first, layers, address, layer_stride, block_stride

    def store_array(self, hashes: Sequence[bytes], array, layer: Optional[int] = None, first_layer: int = 0) -> int:
        """Stores a whole numpy array in one call, without copies: ``array`` is
        ``[layers, blocks, ...]`` holding layers ``first_layer..`` of the blocks (or, with
        ``layer``, ``[blocks, ...]`` holding that one layer). Any dtype; any strides on the
        layer and block axes (slices of a bigger buffer are fine); the dimensions after the
        block axis must be C-contiguous and hold ``layer_bytes``. Returns the blocks stored
        from the start; raises ValueError for a wrong shape and SpillwayError (101 = partial,
        ``count``) if blocks failed."""
        packed, first, layers, address, layer_stride, block_stride = self._array_call(hashes, array, layer, first_layer, False)
        stored = _size(0)
        _check(_kv_store_array(self.handle, packed, len(hashes), first, layers, address, layer_stride, block_stride,
                               self.geometry.layer_bytes, ctypes.byref(stored)), stored.value)
        return stored.value

    def store_array_async(self, hashes: Sequence[bytes], array, layer: Optional[int] = None, first_layer: int = 0) -> StoreTicket:
        """``store_array`` that returns at once; the array must stay unchanged until the
        ticket's ``wait()`` (the binding keeps it referenced until the store completes)."""
        packed, first, layers, address, layer_stride, block_stride = self._array_call(hashes, array, layer, first_layer, False)
        ticket = _u64(0)
        _check(_kv_store_array_async(self.handle, packed, len(hashes), first, layers, address, layer_stride, block_stride,
                                     self.geometry.layer_bytes, ctypes.byref(ticket)))
        return StoreTicket(ticket.value, array)

    def load_array(self, hashes: Sequence[bytes], array, layer: Optional[int] = None, first_layer: int = 0) -> int:
        """Loads blocks into a whole writable numpy array in one call (shapes as for
        ``store_array``; slices must not overlap). Returns the blocks loaded from the start;
        raises SpillwayError (101 = partial, ``count``) if any failed: their slices are left
        as they were."""
        packed, first, layers, address, layer_stride, block_stride = self._array_call(hashes, array, layer, first_layer, True)
        loaded = _size(0)
        _check(_kv_load_array(self.handle, packed, len(hashes), first, layers, address, layer_stride, block_stride,
                              self.geometry.layer_bytes, ctypes.byref(loaded)), loaded.value)
        return loaded.value

    def lookup(self, hashes: Sequence[bytes]) -> int:
        """Blocks stored completely from the start of ``hashes``."""
        matched = _size(0)
        _check(_lookup(self.handle, self._hashes(hashes), len(hashes), ctypes.byref(matched)))
        return matched.value

    def store(self, hashes: Sequence[bytes], buffers: Sequence, layer: Optional[int] = None) -> int:
        """Stores blocks (or one layer of each); returns the blocks stored from the start.
        Raises SpillwayError (status 101 = partial, ``count`` = blocks done) on failure."""
        if len(hashes) != len(buffers):
            raise ValueError("one buffer per block hash")
        keep, array, size = _buffers(buffers, writable=False)
        stored = _size(0)
        _check(_kv_store(self.handle, self._hashes(hashes), len(hashes), -1 if layer is None else layer, array, size,
                         ctypes.byref(stored)), stored.value)
        return stored.value

    def store_async(self, hashes: Sequence[bytes], buffers: Sequence, layer: Optional[int] = None) -> StoreTicket:
        if len(hashes) != len(buffers):
            raise ValueError("one buffer per block hash")
        keep, array, size = _buffers(buffers, writable=False)
        ticket = _u64(0)
        _check(_kv_store_async(self.handle, self._hashes(hashes), len(hashes), -1 if layer is None else layer, array, size,
                               ctypes.byref(ticket)))
        return StoreTicket(ticket.value, (keep, array))

    def load(self, hashes: Sequence[bytes], buffers: Sequence, layer: Optional[int] = None) -> int:
        """Loads blocks (or one layer of each) into writable buffers; returns the blocks loaded
        from the start. Raises SpillwayError (101 = partial, ``count``) if any failed."""
        if len(hashes) != len(buffers):
            raise ValueError("one buffer per block hash")
        keep, array, size = _buffers(buffers, writable=True)
        loaded = _size(0)
        _check(_kv_load(self.handle, self._hashes(hashes), len(hashes), -1 if layer is None else layer, array, size,
                        ctypes.byref(loaded)), loaded.value)
        return loaded.value

    def prefetch(self, hashes: Sequence[bytes]) -> None:
        _check(_kv_prefetch(self.handle, self._hashes(hashes), len(hashes)))

    def pin(self, hashes: Sequence[bytes]) -> None:
        _check(_kv_pin(self.handle, self._hashes(hashes), len(hashes)))

    def unpin(self, hashes: Sequence[bytes]) -> None:
        _check(_kv_unpin(self.handle, self._hashes(hashes), len(hashes)))

    def evict(self, hashes: Sequence[bytes]) -> int:
        removed = _size(0)
        _check(_kv_evict(self.handle, self._hashes(hashes), len(hashes), ctypes.byref(removed)))
        return removed.value
