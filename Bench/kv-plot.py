#!/usr/bin/env python3
"""Bench/kv-plot.py KV.JSONL OUT.SVG: bars of KV save and load GB/s per tier (median of runs)
beside the same-run reference (memcpy for dram, fio for nvme), from Bench/run kv's output.
Python standard library only (no matplotlib)."""
import json
import statistics
import sys
from xml.sax.saxutils import escape


def groups(rows):
    """[(label, [(series, GB/s)])]: referenced tiers first, then the one-run tiers."""
    out = []
    for tier in ("dram", "nvme"):
        runs = [r for r in rows if r["tier"] == tier]
        if not runs:
            continue
        med = lambda f: statistics.median(f(r) for r in runs) / 1e9
        ref = runs[0]["load_reference"]["tier"]
        out.append((f"{tier} (vs {ref}, median of {len(runs)})", [
            ("Spillway save", med(lambda r: r["spillway"]["save_bytes_per_s"])),
            (f"{ref} write", med(lambda r: r["save_reference"]["bytes_per_s"])),
            ("Spillway load", med(lambda r: r["spillway"]["load_bytes_per_s"])),
            (f"{ref} read", med(lambda r: r["load_reference"]["bytes_per_s"])),
        ] + ([("store alone load", med(lambda r: r["store_load"]["bytes_per_s"]))] if all("store_load" in r for r in runs) else [])))
    for r in rows:
        if r["tier"].startswith("all-"):
            s = r["spillway"]
            out.append((f'{r["tier"][4:]} (one run)', [
                ("Spillway save", s["save_bytes_per_s"] / 1e9), ("Spillway load", s["load_bytes_per_s"] / 1e9)]))
    return out


COLORS = {"Spillway save": "#4e79a7", "Spillway load": "#f28e2b", "write": "#a0cbe8", "read": "#ffbe7d",
          "store alone load": "#bab0ac"}


def color(series):
    if series in COLORS:
        return COLORS[series]
    return COLORS["write"] if series.endswith("write") else COLORS["read"]


def render(data, title):
    bar, gap, left, top, height = 34, 44, 70, 50, 300
    width = max(1000, left + sum(len(bars) * bar + gap for _, bars in data) + 40)
    peak = max((v for _, bars in data for _, v in bars), default=1) or 1
    step = 10 ** len(str(int(peak))) / 10 if peak >= 1 else 0.1
    while peak / step > 8:
        step *= 2
    while peak / step < 4:
        step /= 2
    ymax = step * (int(peak / step) + 1)
    y = lambda v: top + height - v / ymax * height
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 110}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="22" font-size="14">{escape(title)}</text>']
    tick = 0.0
    while tick <= ymax + 1e-9:
        svg.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
        tick += step
    svg.append(f'<text x="16" y="{top + height / 2}" transform="rotate(-90 16 {top + height / 2})" text-anchor="middle">GB/s</text>')
    x = left + gap / 2
    for label, bars in data:
        start = x
        for series, value in bars:
            svg.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar - 2}" height="{top + height - y(value):.1f}" fill="{color(series)}">'
                       f'<title>{escape(series)}: {value:.2f} GB/s</title></rect>')
            svg.append(f'<text x="{x + bar / 2 - 1:.1f}" y="{y(value) - 3:.1f}" text-anchor="middle" font-size="9">{value:.1f}</text>')
            x += bar
        head, _, rest = label.partition(" (")
        svg.append(f'<text x="{(start + x) / 2:.1f}" y="{top + height + 16}" text-anchor="middle">{escape(head)}</text>')
        if rest:
            svg.append(f'<text x="{(start + x) / 2:.1f}" y="{top + height + 29}" text-anchor="middle" font-size="9" fill="#555">({escape(rest)}</text>')
        x += gap
    legend = [("Spillway save", COLORS["Spillway save"]), ("reference write (memcpy / fio randwrite)", COLORS["write"]),
              ("Spillway load", COLORS["Spillway load"]), ("reference read (memcpy / fio randread)", COLORS["read"]),
              ("store alone load (no KVPool)", COLORS["store alone load"])]
    lx = left
    for name, fill in legend:
        svg.append(f'<rect x="{lx}" y="{top + height + 44}" width="12" height="12" fill="{fill}"/>')
        svg.append(f'<text x="{lx + 16}" y="{top + height + 54}">{escape(name)}</text>')
        lx += 16 + 6 * len(name) + 16
    svg.append(f'<text x="{left}" y="{top + height + 84}" fill="#555">one layer call = one layer\'s K and V of one block (65,536 B at llama-3-8b); random blocks over the working set</text>')
    svg.append('</svg>')
    return "\n".join(svg) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: Bench/kv-plot.py KV.JSONL OUT.SVG")
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    geometry = next((r["spillway"]["geometry"] for r in rows), "?")
    with open(sys.argv[2], "w") as out:
        out.write(render(groups(rows), f"spillway bench kv: KV offload bandwidth per tier, {geometry}"))


if __name__ == "__main__":
    main()
