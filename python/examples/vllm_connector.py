"""How a vLLM-style KV connector maps onto Spillway (a sketch of the adapter, runnable).

vLLM's KV connector API asks four things of an external KV store:

- ``get_num_new_matched_tokens(request, num_computed_tokens)``: how many more prompt tokens
  have their KV stored externally -> ``KVPool.lookup`` on the request's chained block hashes
  (only whole blocks and only a contiguous prefix count).
- ``start_load_kv(...)``: load those blocks into the paged KV buffers before the forward
  pass, layer by layer -> ``KVPool.load(hashes, buffers, layer=i)``.
- ``save_kv_layer(layer_name, kv_layer, ...)``: after each layer's attention, save that
  layer's blocks -> ``KVPool.store_async(hashes, buffers, layer=i)`` (returns at once).
- ``wait_for_save()``: before the buffers are reused, wait for the saves -> ``ticket.wait()``.

A block becomes visible to lookups only when every layer of it is stored, so a crash or a
failed save never exposes half a block. Buffers here are numpy arrays; in vLLM they are the
GPU paged buffers (staged through host memory until Spillway's device backend exists).
"""

from __future__ import annotations

import numpy as np

from spillway import KVGeometry, Store, StoreTicket


class SpillwayKVConnector:
    def __init__(self, config_path: str | None, geometry: KVGeometry, model_id: str):
        self.store = Store(config_path)
        self.pool = self.store.kv_pool(geometry, model_id)
        self.geometry = geometry
        self.pending: list[StoreTicket] = []

    def _hashes(self, prompt_tokens: list[int]) -> list[bytes]:
        return self.pool.block_hashes(prompt_tokens)

    def get_num_new_matched_tokens(self, prompt_tokens: list[int], num_computed_tokens: int) -> int:
        matched = self.pool.lookup(self._hashes(prompt_tokens)) * self.geometry.tokens_per_block
        return max(0, matched - num_computed_tokens)

    def start_load_kv(self, prompt_tokens: list[int], kv_out: np.ndarray) -> None:
        """kv_out: [layers, blocks, layer_bytes] (uint8 view of the paged KV)."""
        hashes = self._hashes(prompt_tokens)[: self.pool.lookup(self._hashes(prompt_tokens))]
        for layer in range(self.geometry.layers):
            self.pool.load(hashes, list(kv_out[layer, : len(hashes)]), layer=layer)

    def save_kv_layer(self, prompt_tokens: list[int], layer: int, kv_layer: np.ndarray) -> None:
        """kv_layer: [blocks, layer_bytes] for this layer; must stay unchanged until wait_for_save."""
        hashes = self._hashes(prompt_tokens)
        buffers = [np.ascontiguousarray(kv_layer[i]) for i in range(len(hashes))]
        self.pending.append(self.pool.store_async(hashes, buffers, layer=layer))

    def wait_for_save(self) -> None:
        for ticket in self.pending:
            ticket.wait()
        self.pending.clear()

    def close(self) -> None:
        self.wait_for_save()
        self.pool.close()
        self.store.close()
