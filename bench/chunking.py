"""Measure chunking strategies on real root filesystems and a recorded read trace.

    python -m bench.chunking --base ROOTFS_A --image ROOTFS_B --trace TRACE.jsonl [--json OUT]

ROOTFS_B is the image under study, ROOTFS_A an image it shares a history with (dedup: what of B is
already stored once A is). TRACE is `lazyfs mount --trace` output of a workload run on B: the reads
the kernel actually sent (readahead included). For each strategy it reports distinct blocks, unique
bytes, bytes of B new after A, and for the trace the blocks and bytes a cold start would fetch
against the bytes it read (read amplification). docs/format.md quotes the results.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Strategy:
    name: str
    chunk: int | None  # fixed chunk size; None = whole file
    cdc: bool = False
    pack_below: int = 0  # files smaller than this are packed together into ~chunk-sized packs


STRATEGIES = [
    Strategy("fixed 64K", 64 * KiB), Strategy("fixed 256K", 256 * KiB),
    Strategy("fixed 512K", 512 * KiB), Strategy("fixed 1M", MiB), Strategy("fixed 4M", 4 * MiB),
    Strategy("whole file", None), Strategy("cdc avg 1M", MiB, cdc=True),
    Strategy("1M + pack <64K", MiB, pack_below=64 * KiB),
]


def files_of(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                out["/" + os.path.relpath(full, root)] = st.st_size
    return out


def cut(path: Path, size: int, s: Strategy) -> list[tuple[str, int, int]]:
    """(digest, offset, length) of each chunk of one file."""
    if size == 0:
        return []
    data = path.read_bytes()
    if s.cdc and size > s.chunk:
        import fastcdc
        spans = [(c.offset, c.length) for c in fastcdc.fastcdc(
            data, min_size=s.chunk // 4, avg_size=s.chunk, max_size=s.chunk * 4, fat=False, hf=None)]
    elif s.chunk is None:
        spans = [(0, size)]
    else:
        spans = [(o, min(s.chunk, size - o)) for o in range(0, size, s.chunk)]
    return [(hashlib.sha256(data[o:o + n]).hexdigest(), o, n) for o, n in spans]


def layout(root: Path, s: Strategy) -> tuple[dict[str, list], dict[str, int]]:
    """Per file, its chunks; and every distinct block with its size. Packed files map to their pack."""
    files = files_of(root)
    chunks: dict[str, list] = {}
    blocks: dict[str, int] = {}
    pack, pack_members = hashlib.sha256(), []
    pack_size = 0

    def close_pack():
        nonlocal pack, pack_members, pack_size
        if pack_members:
            d = pack.hexdigest()
            blocks[d] = pack_size
            for p, size in pack_members:
                chunks[p] = [(d, 0, size)]
        pack, pack_members, pack_size = hashlib.sha256(), [], 0

    for p in sorted(files):
        size = files[p]
        if s.pack_below and 0 < size < s.pack_below:
            data = (root / p.lstrip("/")).read_bytes()
            pack.update(data)
            pack_members.append((p, size))
            pack_size += size
            if pack_size >= s.chunk:
                close_pack()
            continue
        chunks[p] = cut(root / p.lstrip("/"), size, s)
        for d, _, n in chunks[p]:
            blocks[d] = n
    close_pack()
    return chunks, blocks


def touched(trace: list[dict], chunks: dict[str, list], blocks: dict[str, int]) -> tuple[int, int]:
    need: set[str] = set()
    for r in trace:
        lo, hi = r["offset"], r["offset"] + r["size"]
        for d, o, n in chunks.get(r["path"], []):
            if o < hi and lo < o + n:
                need.add(d)
    return len(need), sum(blocks[d] for d in need)


def read_bytes(trace: list[dict]) -> int:
    pages: set[tuple[str, int]] = set()
    for r in trace:
        for page in range(r["offset"] // 4096, (r["offset"] + r["size"] + 4095) // 4096):
            pages.add((r["path"], page))
    return len(pages) * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    trace = [json.loads(line) for line in a.trace.read_text().splitlines() if line.strip()]
    needed = read_bytes(trace)
    rows = []
    for s in STRATEGIES:
        chunks_b, blocks_b = layout(a.image, s)
        _, blocks_a = layout(a.base, s)
        new = sum(n for d, n in blocks_b.items() if d not in blocks_a)
        n_blocks, fetched = touched(trace, chunks_b, blocks_b)
        rows.append({"strategy": s.name, "blocks": len(blocks_b), "unique_bytes": sum(blocks_b.values()),
                     "new_bytes_after_base": new, "start_blocks": n_blocks, "start_fetched": fetched,
                     "start_read": needed, "read_amplification": round(fetched / needed, 2)})
    print(f"{'strategy':16} {'blocks':>8} {'unique MiB':>10} {'new MiB':>8} {'start blocks':>12} "
          f"{'fetched MiB':>11} {'amplif.':>8}")
    for r in rows:
        print(f"{r['strategy']:16} {r['blocks']:8d} {r['unique_bytes'] / MiB:10.1f} "
              f"{r['new_bytes_after_base'] / MiB:8.1f} {r['start_blocks']:12d} "
              f"{r['start_fetched'] / MiB:11.2f} {r['read_amplification']:8.2f}")
    print(f"bytes the workload read (4 KiB pages): {needed / MiB:.2f} MiB in {len(trace)} reads")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
