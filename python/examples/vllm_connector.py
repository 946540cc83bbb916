"""How a vLLM-style KV connector maps onto Spillway (a sketch of the adapter, runnable).

vLLM's KV connector API asks four things of an external KV store:

- ``get_num_new_matched_tokens(request, num_computed_tokens)``: how many more prompt tokens
  have their KV stored externally -> ``KVPool.lookup`` on the request's chained block hashes
  (only whole blocks and only a contiguous prefix count).
- ``start_load_kv(...)``: load those blocks into the paged KV buffers before the forward
  pass -> ``KVPool.load_array(hashes, kv[:, :blocks])``: every layer of every block in one
  call, straight into the (possibly strided) array.
- ``save_kv_layer(layer_name, kv_layer, ...)``: after each layer's attention, save that
  layer's blocks -> ``KVPool.store_array_async(hashes, kv_layer, layer=i)`` (one call per
  layer, returns at once).
- ``wait_for_save()``: before the buffers are reused, wait for the saves -> ``ticket.wait()``.

A prompt is hashed once (``block_hashes(..., packed=True)``, kept per prompt) however many
calls follow. A block becomes visible to lookups only when every layer of it is stored, so a
crash or a failed save never exposes half a block. Buffers here are numpy arrays; in vLLM they
are the GPU paged buffers (staged through host memory until Spillway's device backend exists).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from spillway import KVGeometry, PackedHashes, Store, StoreTicket


class SpillwayKVConnector:
    # Prompts whose hashes are kept (a request's calls reuse them; older prompts are dropped).
    hashed_prompts = 64

    def __init__(self, config_path: str | None, geometry: KVGeometry, model_id: str):
        self.store = Store(config_path)
        self.pool = self.store.kv_pool(geometry, model_id)
        self.geometry = geometry
        self.pending: list[StoreTicket] = []
        self._hashed: OrderedDict[tuple, PackedHashes] = OrderedDict()

    def _hashes(self, prompt_tokens) -> PackedHashes:
        """The prompt's chained block hashes, computed once per prompt."""
        key = tuple(prompt_tokens)
        hashes = self._hashed.get(key)
        if hashes is None:
            hashes = self.pool.block_hashes(key, packed=True)
            self._hashed[key] = hashes
            if len(self._hashed) > self.hashed_prompts:
                self._hashed.popitem(last=False)
        else:
            self._hashed.move_to_end(key)
        return hashes

    def get_num_new_matched_tokens(self, prompt_tokens: list[int], num_computed_tokens: int) -> int:
        matched = self.pool.lookup(self._hashes(prompt_tokens)) * self.geometry.tokens_per_block
        return max(0, matched - num_computed_tokens)

    def start_load_kv(self, prompt_tokens: list[int], kv_out: np.ndarray) -> int:
        """kv_out: [layers, blocks, ...] (each block's layer slice layer_bytes, e.g. uint8
        [layers, blocks, layer_bytes]); fills the stored prefix in one call, returns its blocks."""
        hashes = self._hashes(prompt_tokens)
        matched = self.pool.lookup(hashes)
        if matched == 0:
            return 0
        return self.pool.load_array(hashes[:matched], kv_out[:, :matched])

    def save_kv_layer(self, prompt_tokens: list[int], layer: int, kv_layer: np.ndarray) -> None:
        """kv_layer: [blocks, ...] for this layer; must stay unchanged until wait_for_save."""
        hashes = self._hashes(prompt_tokens)
        self.pending.append(self.pool.store_array_async(hashes, kv_layer[: len(hashes)], layer=layer))

    def save_kv(self, prompt_tokens: list[int], kv: np.ndarray) -> None:
        """Every layer at once: kv is [layers, blocks, ...]; must stay unchanged until wait_for_save."""
        hashes = self._hashes(prompt_tokens)
        self.pending.append(self.pool.store_array_async(hashes, kv[:, : len(hashes)]))

    def wait_for_save(self) -> None:
        try:
            for ticket in self.pending:
                ticket.wait()
        finally:
            self.pending.clear()

    def close(self) -> None:
        self.wait_for_save()
        self.pool.close()
        self.store.close()
