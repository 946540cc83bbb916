import numpy as np
import pytest

import spillway
from spillway import KVGeometry, SpillwayError, Store

GEOMETRY = KVGeometry(tokens_per_block=4, layers=3, kv_heads=2, head_dim=8, dtype_size=2)  # 256 B per layer


def test_version_and_library():
    assert spillway.version()
    assert spillway.library_path()


def test_pages_round_trip_with_numpy_and_bytes(config):
    with Store(config) as store:
        page = np.arange(3000, dtype=np.uint16)
        store.put(7, page)
        assert np.frombuffer(store.get(7), dtype=np.uint16).tolist() == page.tolist()
        out = np.zeros(3000, dtype=np.uint16)
        assert store.get(7, into=out) == page.nbytes
        assert (out == page).all()
        store.put(b"\x00" * 15 + b"\x08", b"hello")
        assert store.get(8) == b"hello"
        assert store.stats()["puts"] == 2
        # A get without `into` is one get, not a size query plus a get (which counted, and
        # promoted, every page twice); a page larger than the first guess still comes back whole.
        before = store.stats()["gets"]
        assert store.get(8) == b"hello"
        assert store.stats()["gets"] == before + 1
        large = bytes(range(256)) * 400  # 100 KiB, past the first 64 KiB guess
        store.put(11, large)
        assert store.get(11) == large
        with pytest.raises(SpillwayError) as error:
            store.get(9)
        assert error.value.name == "unknown key"
        with pytest.raises(SpillwayError) as error:
            store.get(7, into=np.zeros(10, dtype=np.uint8))
        assert error.value.name == "buffer too small"


def test_bad_input_is_a_clear_error(config):
    with pytest.raises(SpillwayError) as error:
        Store("/nonexistent.toml")
    assert error.value.name == "invalid configuration"
    store = Store(config)
    with pytest.raises(SpillwayError) as error:
        store.kv_pool(KVGeometry(tokens_per_block=0, layers=1, kv_heads=1, head_dim=1), "m")
    assert "tokens per block" in str(error.value)
    pool = store.kv_pool(GEOMETRY, "m")
    hashes = pool.block_hashes(range(8))
    with pytest.raises(SpillwayError) as error:
        pool.store(hashes, [np.zeros(10, np.uint8), np.zeros(10, np.uint8)])  # wrong size
    assert error.value.name == "invalid argument"
    with pytest.raises(ValueError):
        pool.store(hashes, [np.zeros(GEOMETRY.block_bytes, np.uint8)])  # one buffer for two blocks
    store.close()
    with pytest.raises(SpillwayError) as error:
        pool.lookup(hashes)  # the pool went with its store
    assert error.value.name == "invalid handle"
    with pytest.raises(SpillwayError):
        store.put(1, b"x")


def test_kv_blocks_per_layer_visibility_and_partial_loads(config):
    with Store(config) as store:
        pool = store.kv_pool(GEOMETRY, "llama-test")
        tokens = list(range(14))  # 3 full blocks
        hashes = pool.block_hashes(tokens)
        assert len(hashes) == 3 and all(len(h) == 16 for h in hashes)
        assert hashes == pool.block_hashes(tokens), "stable"
        rng = np.random.default_rng(1)
        blocks = rng.integers(0, 255, size=(3, GEOMETRY.layers, GEOMETRY.layer_bytes), dtype=np.uint8)
        for layer in range(GEOMETRY.layers - 1):
            assert pool.store(hashes, list(blocks[:, layer]), layer=layer) == 3
            assert pool.lookup(hashes) == 0
        ticket = pool.store_async(hashes, [np.ascontiguousarray(blocks[i, -1]) for i in range(3)], layer=GEOMETRY.layers - 1)
        assert ticket.wait() == 3
        assert pool.lookup(hashes) == 3
        out = np.zeros((3, GEOMETRY.layers, GEOMETRY.layer_bytes), dtype=np.uint8)
        assert pool.load(hashes, list(out)) == 3
        assert (out == blocks).all()
        layer1 = np.zeros((3, GEOMETRY.layer_bytes), dtype=np.uint8)
        assert pool.load(hashes, list(layer1), layer=1) == 3
        assert (layer1 == blocks[:, 1]).all()
        pool.prefetch(hashes)
        pool.pin(hashes[:1])
        pool.unpin(hashes[:1])
        assert pool.evict(hashes[1:2]) == 1
        with pytest.raises(SpillwayError) as error:
            pool.load(hashes, list(np.zeros_like(out)))
        assert error.value.name == "partial" and error.value.count == 1
        pool.close()


def test_vllm_style_connector_example(config):
    from examples.vllm_connector import SpillwayKVConnector

    connector = SpillwayKVConnector(config, GEOMETRY, model_id="llama-test")
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    assert connector.get_num_new_matched_tokens(prompt, num_computed_tokens=0) == 0
    rng = np.random.default_rng(2)
    kv = rng.integers(0, 255, size=(GEOMETRY.layers, 3, GEOMETRY.layer_bytes), dtype=np.uint8)
    for layer in range(GEOMETRY.layers):
        connector.save_kv_layer(prompt, layer, kv[layer])
    connector.wait_for_save()
    assert connector.get_num_new_matched_tokens(prompt, num_computed_tokens=0) == 12
    assert connector.get_num_new_matched_tokens(prompt, num_computed_tokens=4) == 8
    out = np.zeros_like(kv)
    connector.start_load_kv(prompt, out)
    assert (out == kv).all()
    connector.close()


def write_safetensors(path, tensors):
    """tensors: name -> numpy array (C-contiguous). The reference layout: u64 LE header length,
    JSON header, data."""
    import json
    import struct

    header, offset, blobs = {}, 0, []
    dtypes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}
    for name, array in tensors.items():
        data = array.tobytes()
        header[name] = {"dtype": dtypes[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_weights_stream_layers(config, tmp_path):
    rng = np.random.default_rng(3)
    tensors = {f"model.layers.{i}.mlp.weight": rng.standard_normal((64, 32)).astype(np.float16) for i in range(4)}
    tensors["model.embed_tokens.weight"] = rng.standard_normal((16, 32)).astype(np.float32)
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, tensors)
    with Store(config) as store:
        weights = store.register_weights(path, "tiny", device_budget=1 << 20, prefetch=2)
        assert weights.layers() == [-1, 0, 1, 2, 3]
        for layer in range(4):
            views = weights.acquire(layer)
            name = f"model.layers.{layer}.mlp.weight"
            assert np.array_equal(np.frombuffer(views[name], dtype=np.float16).reshape(64, 32), tensors[name])
            weights.release(layer)
        shared = weights.acquire(-1)
        assert np.array_equal(np.frombuffer(shared["model.embed_tokens.weight"], dtype=np.float32).reshape(16, 32),
                              tensors["model.embed_tokens.weight"])
        # Acquiring a layer already held (so loaded) never waits: the stall total stays put.
        stall = weights.stall_seconds()
        again = weights.acquire(-1)
        assert weights.stall_seconds() == stall
        again.release()
        weights.release(-1)
        with pytest.raises(SpillwayError) as error:
            weights.acquire(9)
        assert error.value.name == "invalid argument" and "no layer 9" in str(error.value)
        weights.close()
        with pytest.raises(SpillwayError) as error:
            weights.layers()
        assert error.value.name == "invalid handle"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with Store(config) as store:
        with pytest.raises(SpillwayError) as error:
            store.register_weights(str(bad), "bad", device_budget=1 << 20)
        assert error.value.name == "invalid argument"


def test_weights_views_are_unusable_after_release_and_close(config, tmp_path):
    rng = np.random.default_rng(4)
    tensors = {f"model.layers.{i}.w": rng.integers(0, 255, size=4096, dtype=np.uint8) for i in range(3)}
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, tensors)
    store = Store(config)
    weights = store.register_weights(path, "views", device_budget=1 << 20, prefetch=1)
    views = weights.acquire(0)
    view = views["model.layers.0.w"]
    assert bytes(view) == tensors["model.layers.0.w"].tobytes()
    weights.release(0)
    # The layer's memory may now be reused by the prefetcher: the view must refuse, not read it.
    with pytest.raises(ValueError, match="released"):
        bytes(view)
    with pytest.raises(ValueError, match="released"):
        view[0]

    # A copy outlives the acquisition; read_layer copies and leaves nothing acquired.
    held = weights.acquire(1)
    copied = np.array(held["model.layers.1.w"])
    held.release()
    assert np.array_equal(copied, tensors["model.layers.1.w"])
    assert weights.read_layer(1) == {"model.layers.1.w": tensors["model.layers.1.w"].tobytes()}
    with pytest.raises(SpillwayError) as error:
        weights.release(1)
    assert error.value.name == "not acquired"

    # Closing the weights (and the store) invalidates what is still acquired.
    kept = weights.acquire(2)["model.layers.2.w"]
    weights.close()
    with pytest.raises(ValueError, match="released"):
        bytes(kept)
    weights = store.register_weights(path, "views-2", device_budget=1 << 20, prefetch=1)
    kept = weights.acquire(0)["model.layers.0.w"]
    del weights  # the store still reaches the acquisition
    store.close()
    with pytest.raises(ValueError, match="released"):
        bytes(kept)


def test_weights_release_is_paired_with_acquire(config, tmp_path):
    tensors = {f"model.layers.{i}.w": np.full(64, i, dtype=np.uint8) for i in range(2)}
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, tensors)
    with Store(config) as store:
        weights = store.register_weights(path, "paired", device_budget=1 << 20, prefetch=1)
        with pytest.raises(SpillwayError) as error:
            weights.release(0)  # never acquired
        assert error.value.name == "not acquired" and error.value.status == 102
        first = weights.acquire(0)
        second = weights.acquire(0)
        weights.release(0)  # the oldest acquisition
        assert first.released and not second.released
        assert bytes(second["model.layers.0.w"]) == bytes(64)
        second.release()
        with pytest.raises(SpillwayError) as error:
            second.release()  # twice
        assert error.value.name == "not acquired"
        with pytest.raises(SpillwayError) as error:
            weights.release(0)  # as many releases as acquires already
        assert error.value.name == "not acquired"
        with weights.acquire(1) as layer:
            assert bytes(layer["model.layers.1.w"]) == bytes([1] * 64)
        assert layer.released
        weights.close()


def test_dropped_store_tickets_keep_their_buffers_until_the_store_completes(tmp_path):
    """Under the old binding a ticket dropped without wait() freed the buffers the library's
    worker was still reading: the stored blocks held garbage (or the process crashed)."""
    import gc
    import time

    config = tmp_path / "big.toml"
    config.write_text('slot-size = "4k"\nmax-page-size = "256k"\n[[tier]]\nkind = "dram"\ncapacity = "64m"\n')
    geometry = KVGeometry(tokens_per_block=16, layers=2, kv_heads=8, head_dim=128, dtype_size=2)  # 64 KiB layers
    with Store(str(config)) as store:
        pool = store.kv_pool(geometry, "dropped-tickets")
        blocks = 32
        hashes = pool.block_hashes(range(16 * blocks))
        for index in range(blocks):
            # Nothing but the (immediately dropped) ticket refers to the buffer.
            pool.store_async(hashes[index:index + 1], [np.full(geometry.block_bytes, index % 251, dtype=np.uint8)])
        gc.collect()
        # Reuse freed memory with a different pattern, so a store reading freed buffers stores it.
        clutter = [np.full(geometry.block_bytes, 0xEE, dtype=np.uint8) for _ in range(blocks)]
        deadline = time.monotonic() + 30
        while pool.lookup(hashes) < blocks or spillway.inflight_stores() > 0:
            assert time.monotonic() < deadline, f"stores incomplete: {pool.lookup(hashes)} of {blocks} blocks, " \
                                                f"{spillway.inflight_stores()} in flight"
            time.sleep(0.01)  # polling a condition with a deadline, not synchronising by time
        out = np.zeros((blocks, geometry.block_bytes), dtype=np.uint8)
        assert pool.load(hashes, list(out)) == blocks
        for index in range(blocks):
            assert (out[index] == index % 251).all(), f"block {index} does not hold what was stored"
        del clutter
        pool.close()


def test_store_stall_counts_only_lower_tier_reads(config, tmp_path):
    """stall_nanoseconds is time API calls waited on tiers below the top: 0 for a DRAM-only
    store, positive once gets had to read pages from NVMe."""
    with Store(config) as store:
        for key in range(8):
            store.put(key, bytes([key]) * 4096)
        for key in range(8):
            assert store.get(key) == bytes([key]) * 4096
        stats = store.stats()
        assert stats["misses"] == 0 and stats["tiers"][0]["hits"] >= 8  # (get() asks for the size first)
        assert stats["stall_nanoseconds"] == 0

    layered = tmp_path / "layered.toml"
    layered.write_text('slot-size = "4k"\nmax-page-size = "64k"\n'
                       '[[tier]]\nkind = "dram"\ncapacity = "64k"\n'
                       f'[[tier]]\nkind = "nvme"\ncapacity = "16m"\npath = "{tmp_path / "spill.nvme"}"\n')
    with Store(str(layered)) as store:
        pages = 64  # 256 KiB: four times what DRAM holds, so most pages land on NVMe
        for key in range(pages):
            store.put(key, bytes([key]) * 4096)
        before = store.stats()
        assert before["tiers"][1]["pages"] > 0, before
        for key in range(pages):
            assert store.get(key) == bytes([key]) * 4096
        after = store.stats()
        assert after["tiers"][1]["hits"] > 0, after
        assert after["tiers"][0]["stall_nanoseconds"] == 0
        assert after["stall_nanoseconds"] > before["stall_nanoseconds"]


def test_put_with_page_class_and_hints(config, tmp_path):
    with Store(config) as store:
        assert store.stats()["policy"] == "prefix-lru"
        store.put(1, b"parent")
        assert store.page_hints(1) == {"page_class": "generic", "order": 0, "parent_id": 0}
        store.put(2, np.arange(100, dtype=np.uint8), page_class="kv_block", order=5, parent=1)
        assert store.page_hints(2) == {"page_class": "kv_block", "order": 5, "parent_id": spillway.parent_id(1)}
        assert spillway.parent_id(1) != 0
        assert store.get(2) == bytes(range(100))
        store.put(3, b"w", page_class="weights", order=70000)
        assert store.page_hints(3) == {"page_class": "weights", "order": 65535, "parent_id": 0}
        with pytest.raises(ValueError):
            store.put(4, b"x", page_class="activations")
        with pytest.raises(ValueError):
            store.put(4, b"x", page_class="weights", order=-1)
        with pytest.raises(SpillwayError) as error:
            store.page_hints(4)
        assert error.value.name == "unknown key"
    lru = tmp_path / "lru.toml"
    lru.write_text('policy = "lru"\n' + open(config).read())
    with Store(str(lru)) as store:
        assert store.stats()["policy"] == "lru"
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('policy = "mru"\n' + open(config).read())
    with pytest.raises(SpillwayError) as error:
        Store(str(unknown))
    assert error.value.name == "invalid configuration"
    assert "class-aware-lru, lru" in str(error.value)


def test_submitted_batches_round_trip_and_report_each_page(config):
    with Store(config) as store:
        pages = [np.full(4096, i, dtype=np.uint8) for i in range(32)]
        batch = store.submit_put(range(100, 132), pages, queue_depth=8)
        assert batch.wait(timeout=30) == 32
        outs = [np.zeros(4096, dtype=np.uint8) for _ in range(33)]
        batch = store.submit_get(list(range(100, 132)) + [999], outs)
        assert batch.wait() == 32
        assert batch.statuses[:32] == [0] * 32 and batch.statuses[32] == 4  # 4: unknown key
        assert batch.lengths[:32] == [4096] * 32
        assert all(latency > 0 for latency in batch.latencies_ns[:32])
        assert all((out == page).all() for out, page in zip(outs, pages))
        with pytest.raises(SpillwayError):
            batch.wait()  # a ticket is waited for once
        with pytest.raises(ValueError):
            store.submit_get([1, 2], [outs[0]])
