"""Whole-array KV calls: KVPool.store_array / store_array_async / load_array."""

import numpy as np
import pytest

from spillway import KVGeometry, PackedHashes, SpillwayError, Store

GEOMETRY = KVGeometry(tokens_per_block=4, layers=3, kv_heads=2, head_dim=8, dtype_size=2)  # 256 B per layer


def pattern(shape, seed):
    return np.random.default_rng(seed).integers(0, 255, size=shape, dtype=np.uint8)


def test_contiguous_array_round_trip_every_layer_in_one_call(config):
    with Store(config) as store:
        pool = store.kv_pool(GEOMETRY, "arrays")
        hashes = pool.block_hashes(range(20))  # 5 blocks
        kv = pattern((GEOMETRY.layers, 5, GEOMETRY.layer_bytes), 1)
        assert pool.store_array(hashes, kv) == 5
        assert pool.lookup(hashes) == 5
        out = np.zeros_like(kv)
        assert pool.load_array(hashes, out) == 5
        assert np.array_equal(out, kv)
        # The per-block calls see the same bytes.
        blocks = np.zeros((5, GEOMETRY.block_bytes), dtype=np.uint8)
        assert pool.load(hashes, list(blocks)) == 5
        assert np.array_equal(blocks.reshape(5, GEOMETRY.layers, -1), kv.transpose(1, 0, 2))
        pool.close()


def test_any_dtype_and_trailing_shape(config):
    with Store(config) as store:
        pool = store.kv_pool(GEOMETRY, "dtypes")
        hashes = pool.block_hashes(range(8), packed=True)
        assert isinstance(hashes, PackedHashes) and len(hashes) == 2
        # [layers, blocks, K/V, tokens, heads, head_dim] float16: 2*4*2*8*2 = 256 bytes per slice.
        kv = np.random.default_rng(2).standard_normal((3, 2, 2, 4, 2, 8)).astype(np.float16)
        assert pool.store_array(hashes, kv) == 2
        out = np.zeros_like(kv)
        assert pool.load_array(hashes, out) == 2
        assert np.array_equal(out.view(np.uint16), kv.view(np.uint16))
        pool.close()


def test_strided_arrays_round_trip(config):
    with Store(config) as store:
        pool = store.kv_pool(GEOMETRY, "strided")
        hashes = pool.block_hashes(range(12))  # 3 blocks
        # vLLM-like [blocks, layers, layer_bytes] buffer with spare blocks, viewed as [layers, blocks].
        big = pattern((7, GEOMETRY.layers, GEOMETRY.layer_bytes), 3)
        view = big.transpose(1, 0, 2)[:, 2:5]  # blocks 2, 3, 4 of the buffer
        assert not view.flags.c_contiguous
        assert pool.store_array(hashes, view) == 3
        out_big = np.zeros((GEOMETRY.layers, 10, GEOMETRY.layer_bytes), dtype=np.uint8)
        out = out_big[:, 1:7:2]  # every other block of a bigger array
        assert pool.load_array(hashes, out) == 3
        assert np.array_equal(out, view)
        assert not out_big[:, 0::2].any(), "nothing outside the slices was written"

        # A subset of layers, and one layer of [blocks, ...].
        other = pool.block_hashes(range(100, 108))  # 2 blocks
        kv = pattern((GEOMETRY.layers, 2, GEOMETRY.layer_bytes), 4)
        assert pool.store_array(other, kv[:2], first_layer=0) == 2
        assert pool.lookup(other) == 0, "a block is visible only once every layer is stored"
        ticket = pool.store_array_async(other, kv[2], layer=2)
        assert ticket.wait() == 2
        assert pool.lookup(other) == 2
        layer1 = np.zeros((2, GEOMETRY.layer_bytes), dtype=np.uint8)
        assert pool.load_array(other, layer1, layer=1) == 2
        assert np.array_equal(layer1, kv[1])
        tail = np.zeros((2, 2, GEOMETRY.layer_bytes), dtype=np.uint8)
        assert pool.load_array(other, tail, first_layer=1) == 2
        assert np.array_equal(tail, kv[1:])
        pool.close()


def test_async_array_store_of_every_layer(config):
    with Store(config) as store:
        pool = store.kv_pool(GEOMETRY, "async")
        hashes = pool.block_hashes(range(16))
        kv = pattern((GEOMETRY.layers, 4, GEOMETRY.layer_bytes), 5)
        ticket = pool.store_array_async(hashes, kv)
        assert ticket.wait() == 4
        out = np.zeros_like(kv)
        assert pool.load_array(hashes, out) == 4
        assert np.array_equal(out, kv)
        pool.close()


def test_whole_block_pool_takes_block_major_arrays(config):
    geometry = KVGeometry(tokens_per_block=4, layers=3, kv_heads=2, head_dim=8, dtype_size=2, layout="whole-block")
    with Store(config) as store:
        pool = store.kv_pool(geometry, "whole")
        hashes = pool.block_hashes(range(8))
        blocks = pattern((2, geometry.layers, geometry.layer_bytes), 6)  # each block's layers back to back
        assert pool.store_array(hashes, blocks.transpose(1, 0, 2)) == 2
        out = np.zeros_like(blocks)
        assert pool.load_array(hashes, out.transpose(1, 0, 2)) == 2
        assert np.array_equal(out, blocks)
        with pytest.raises(SpillwayError) as error:  # layer-major: a block is not one run of bytes
            pool.store_array(hashes, np.ascontiguousarray(blocks.transpose(1, 0, 2)))
        assert error.value.name == "invalid argument" and "whole-block" in str(error.value)
        pool.close()


def test_partial_loads_leave_missing_blocks_alone(config):
    with Store(config) as store:
        pool = store.kv_pool(GEOMETRY, "partial")
        hashes = pool.block_hashes(range(12))
        kv = pattern((GEOMETRY.layers, 3, GEOMETRY.layer_bytes), 7)
        assert pool.store_array(hashes, kv) == 3
        assert pool.evict(hashes[1:2]) == 1
        out = np.full_like(kv, 0xAB)
        with pytest.raises(SpillwayError) as error:
            pool.load_array(hashes, out)
        assert error.value.name == "partial" and error.value.count == 1
        assert np.array_equal(out[:, 0], kv[:, 0]) and np.array_equal(out[:, 2], kv[:, 2])
        assert (out[:, 1] == 0xAB).all()
        pool.close()


def test_wrong_arrays_are_clear_errors(config):
    with Store(config) as store:
        pool = store.kv_pool(GEOMETRY, "errors")
        hashes = pool.block_hashes(range(8))  # 2 blocks
        good = pattern((GEOMETRY.layers, 2, GEOMETRY.layer_bytes), 8)
        with pytest.raises(ValueError, match="256"):
            pool.store_array(hashes, np.zeros((3, 2, 100), np.uint8))  # wrong slice size
        with pytest.raises(ValueError, match="2 hashes"):
            pool.store_array(hashes, np.zeros((3, 5, 256), np.uint8))  # wrong block count
        with pytest.raises(ValueError, match="C-contiguous"):
            pool.store_array(hashes, np.zeros((3, 2, 512), np.uint8)[:, :, ::2])
        with pytest.raises(ValueError, match="shape"):
            pool.store_array(hashes, np.zeros(256, np.uint8))
        with pytest.raises(ValueError, match="object"):
            pool.store_array(hashes, np.empty((3, 2, 32), dtype=object))
        with pytest.raises(ValueError, match="numpy array"):
            pool.store_array(hashes, [bytes(256)] * 2)
        with pytest.raises(ValueError, match="outside"):
            pool.store_array(hashes, good, first_layer=1)  # layers 1..3 of 3
        with pytest.raises(ValueError, match="negative"):
            pool.store_array(hashes, good[:, ::-1])
        readonly = np.zeros_like(good)
        readonly.flags.writeable = False
        with pytest.raises(ValueError, match="writable"):
            pool.load_array(hashes, readonly)
        assert pool.store_array(hashes, good) == 2
        with pytest.raises(SpillwayError) as error:  # the library refuses overlapping destinations
            pool.load_array(hashes, np.lib.stride_tricks.as_strided(np.zeros(4096, np.uint8), (3, 2, 256), (256, 128, 1)))
        assert error.value.name == "invalid argument" and "overlap" in str(error.value)
        assert pool.lookup(hashes) == 2
        pool.close()


def test_large_arrays_split_over_threads_round_trip(tmp_path):
    """10 MiB per call: well above the size at which the library splits a batch over threads."""
    config = tmp_path / "large.toml"
    config.write_text('slot-size = "64k"\nmax-page-size = "64k"\n[[tier]]\nkind = "dram"\ncapacity = "64m"\nprefault = false\n')
    geometry = KVGeometry(tokens_per_block=16, layers=2, kv_heads=8, head_dim=128, dtype_size=2)  # 64 KiB per layer
    with Store(str(config)) as store:
        pool = store.kv_pool(geometry, "large")
        hashes = pool.block_hashes(range(16 * 80), packed=True)  # 80 blocks
        buffer = pattern((80, geometry.layers, geometry.layer_bytes), 9)  # block-major, viewed layer-major
        ticket = pool.store_array_async(hashes, buffer.transpose(1, 0, 2))
        assert ticket.wait() == 80
        assert pool.lookup(hashes) == 80
        out = np.zeros((geometry.layers, 80, geometry.layer_bytes), dtype=np.uint8)
        assert pool.load_array(hashes, out) == 80
        assert np.array_equal(out, buffer.transpose(1, 0, 2))
        assert pool.store_array(hashes, out[::-1].copy()) == 80  # overwrite: layers swapped
        again = np.zeros_like(buffer)
        assert pool.load_array(hashes, again.transpose(1, 0, 2)) == 80
        assert np.array_equal(again[:, 0], buffer[:, 1]) and np.array_equal(again[:, 1], buffer[:, 0])
        pool.close()
