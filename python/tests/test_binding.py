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
        weights.release(-1)
        with pytest.raises(SpillwayError):
            weights.acquire(9)
        assert weights.stall_seconds() >= 0
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
