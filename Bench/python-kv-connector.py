#!/usr/bin/env python3
"""The Python KV connector's save and load beside a numpy copy of the same bytes.

    swift build -c release --product SpillwayC
    SPILLWAY_LIBRARY=$PWD/.build/release/libSpillwayC.so /usr/bin/python3 Bench/python-kv-connector.py [--repeats 5] [--json]

Geometry: llama-3-8b (16 tokens per block, 32 layers, 8 KV heads, head dim 128, fp16: 64 KiB per
layer slice of a block), a 1,024-token prompt (64 blocks): 128 MiB per save or load. The store
is one DRAM tier of 64 KiB slots (prefaulted). Each repeat, interleaved in one process:

- copy: ``np.copyto`` of the [layers, blocks, layer_bytes] array into a prefaulted array of the
  same shape (one thread, like the store's worker);
- save: the connector's vLLM-style path, ``save_kv_layer`` for each of the 32 layers (one
  ``store_array_async`` call per layer) then ``wait_for_save``;
- load: ``start_load_kv`` (lookup, then one ``load_array`` call for every layer and block)
  into a prefaulted array; the bytes are checked afterwards (not timed).

Each repeat uses a fresh prompt and evicts the previous one afterwards (so saves write new
pages, never overwrite). Reported: the median GiB/s of each and the ratios save/copy,
load/copy (target ≥ 0.7). With --breakdown it also times where a save and a load spend their
time: the synchronous whole-array call alone (``store_array`` / ``load_array``), the Python
side of a call (argument checks and ctypes, measured on a zero-block call), the old
per-block path (a list of per-block views per layer) for comparison, and np.copyto of each
64 KiB (layer, block) slice on its own (the store copies page by page: small copies do not get
the non-temporal stores a 128 MiB memcpy uses). This script prints; it
asserts nothing beyond the loaded bytes.

What bounds the ratios (perf record of store_array/load_array loops, release build): a load is
~80% memmove of 64 KiB pages, so it runs at the speed of np.copyto per 64 KiB slice, not of one
128 MiB copy; a save is memmove plus the store's CRC32C of every page (~40% + ~20% of cycles).
The Python side (argument checks, ctypes) is a few microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
os.environ.setdefault("SPILLWAY_LIBRARY", str(ROOT / ".build" / "release" / "libSpillwayC.so"))

import numpy as np  # noqa: E402

from examples.vllm_connector import SpillwayKVConnector  # noqa: E402
from spillway import KVGeometry  # noqa: E402

GIB = float(1 << 30)


def timed(body) -> float:
    start = time.perf_counter()
    body()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (at least 3), after one warm-up")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length (a multiple of 16)")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of a save and a load")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")

    geometry = KVGeometry(tokens_per_block=16, layers=32, kv_heads=8, head_dim=128, dtype_size=2)
    blocks = args.tokens // geometry.tokens_per_block
    total = geometry.layers * blocks * geometry.layer_bytes
    capacity_mib = max(64, 4 * total >> 20)
    scratch = tempfile.mkdtemp(prefix="spillway-pybench-")
    config = Path(scratch) / "spillway.toml"
    config.write_text(f'slot-size = "64k"\nmax-page-size = "64k"\n[[tier]]\nkind = "dram"\ncapacity = "{capacity_mib}m"\nprefault = true\n')

    connector = SpillwayKVConnector(str(config), geometry, model_id="meta-llama/Llama-3-8B")
    pool = connector.pool
    kv = np.frombuffer(np.random.default_rng(0).bytes(total), dtype=np.uint8).reshape(geometry.layers, blocks, geometry.layer_bytes)
    kv = kv.copy()  # writable, owned
    copy_out = np.ones_like(kv)
    load_out = np.ones_like(kv)

    copies, saves, loads = [], [], []
    extra = {"store_array": [], "load_array": [], "per_block_save": [], "per_block_load": [], "copy_64k_slices": []}
    call_overhead = None
    previous = None
    for round_ in range(args.repeats + 1):
        prompt = [round_ * 1_000_003 + t for t in range(args.tokens)]
        copy_seconds = timed(lambda: np.copyto(copy_out, kv))

        def save():
            for layer in range(geometry.layers):
                connector.save_kv_layer(prompt, layer, kv[layer])
            connector.wait_for_save()

        connector._hashes(prompt)  # hashing is per request, outside the copy it is compared with
        save_seconds = timed(save)
        assert connector.get_num_new_matched_tokens(prompt, 0) == blocks * geometry.tokens_per_block
        load_out.fill(1)
        load_seconds = timed(lambda: connector.start_load_kv(prompt, load_out))
        if not np.array_equal(load_out, kv):
            print("loaded bytes differ from the saved ones", file=sys.stderr)
            return 1
        if args.breakdown:
            hashes = connector._hashes(prompt)
            seconds = {
                "store_array": timed(lambda: pool.store_array(hashes, kv)),
                "load_array": timed(lambda: pool.load_array(hashes, load_out)),
                "per_block_save": timed(lambda: [pool.store(hashes, list(kv[layer]), layer=layer) for layer in range(geometry.layers)]),
                "per_block_load": timed(lambda: [pool.load(hashes, list(load_out[layer]), layer=layer) for layer in range(geometry.layers)]),
                # The reference in the store's unit: np.copyto of each 64 KiB (layer, block) slice.
                "copy_64k_slices": timed(lambda: [np.copyto(copy_out[layer, block], kv[layer, block])
                                                  for layer in range(geometry.layers) for block in range(blocks)]),
            }
            if round_ > 0:
                for name, value in seconds.items():
                    extra[name].append(value)
            if call_overhead is None:
                empty = np.zeros((geometry.layers, 0, geometry.layer_bytes), dtype=np.uint8)
                calls = 2000
                call_overhead = timed(lambda: [pool.load_array(hashes[:0], empty) for _ in range(calls)]) / calls
        if previous is not None:
            pool.evict(connector._hashes(previous))
        previous = prompt
        if round_ == 0:
            continue  # warm-up
        copies.append(copy_seconds)
        saves.append(save_seconds)
        loads.append(load_seconds)
    connector.close()

    def rate(seconds):
        return total / statistics.median(seconds) / GIB

    result = {
        "geometry": {"tokens": args.tokens, "blocks": blocks, "layers": geometry.layers, "layer_bytes": geometry.layer_bytes,
                     "bytes": total},
        "library": os.environ["SPILLWAY_LIBRARY"],
        "repeats": args.repeats,
        "copy_gib_s": round(rate(copies), 3),
        "save_gib_s": round(rate(saves), 3),
        "load_gib_s": round(rate(loads), 3),
        "save_over_copy": round(rate(saves) / rate(copies), 3),
        "load_over_copy": round(rate(loads) / rate(copies), 3),
        "target": 0.7,
        "rounds": {"copy_s": copies, "save_s": saves, "load_s": loads},
    }
    if args.breakdown:
        result["breakdown"] = {name + "_gib_s": round(rate(values), 3) for name, values in extra.items()}
        result["breakdown"]["python_call_overhead_us"] = round(call_overhead * 1e6, 2)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{blocks} blocks x {geometry.layers} layers x {geometry.layer_bytes >> 10} KiB = {total >> 20} MiB, "
              f"median of {args.repeats} ({result['library']})")
        print(f"  numpy copy   {result['copy_gib_s']:7.2f} GiB/s")
        print(f"  save         {result['save_gib_s']:7.2f} GiB/s   save/copy {result['save_over_copy']:.2f}  (target >= 0.7)")
        print(f"  load         {result['load_gib_s']:7.2f} GiB/s   load/copy {result['load_over_copy']:.2f}  (target >= 0.7)")
        for name, value in result.get("breakdown", {}).items():
            print(f"  {name:28s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
