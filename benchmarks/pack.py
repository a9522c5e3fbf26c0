"""Archive sizes and times (CPU): the tar payload of a manifest's entries compressed with each
standard-library codec fa4aot could use, and `fa4aot pack` / `fa4aot install` end to end.

    python benchmarks/pack.py --cache CACHE --manifest manifests/ci.yaml [--json out.json]

Per codec: compressed size, compression and decompression seconds (median of --repeat runs).
End to end: `pack --manifest` and `install` into an empty cache, in fresh processes.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import lzma
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CODECS = {
    "gzip -9": (lambda b: gzip.compress(b, 9, mtime=0), gzip.decompress),
    "bz2 -9": (lambda b: bz2.compress(b, 9), bz2.decompress),
    "xz -6": (lambda b: lzma.compress(b, preset=6), lzma.decompress),
    "xz -9 (fa4aot)": (lambda b: lzma.compress(b, preset=9), lzma.decompress),
    "xz -9e": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
}


def timed(fn, *a, repeat=3):
    ts, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*a)
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def cli(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fa4aot.tools.cli", *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    from fa4aot.compile import manifest
    from fa4aot.compile.archive import cache_entries, select_entries
    from fa4aot.core.index import Cache
    from fa4aot.plan.abi import SHIM_ABI
    from fa4aot.runtime.loader import host_arch

    cache = Cache(args.cache)
    variants = [pv.variant for pv in manifest.load(args.manifest).variants]
    entries = select_entries(
        cache_entries(cache), args.cache, host_arch=host_arch(), variants=variants, shim_abi=SHIM_ABI
    )
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        seen = set()
        for e in entries:
            for role, b in e.blobs.items():
                if b.sha256 not in seen:
                    seen.add(b.sha256)
                    data = cache.read_blob(e, role)
                    info = tarfile.TarInfo(f"blobs/{b.sha256}.{b.ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    payload = raw.getvalue()
    rows = []
    for name, (comp, decomp) in CODECS.items():
        data, tc = timed(comp, payload, repeat=args.repeat)
        _, td = timed(decomp, data, repeat=args.repeat)
        rows.append(
            {"codec": name, "bytes": len(data), "ratio": len(payload) / len(data), "compress_s": tc, "decompress_s": td}
        )
    with tempfile.TemporaryDirectory() as tmp:
        arc = Path(tmp) / "a.fa4"
        t_pack = cli("pack", "--cache", args.cache, "--manifest", args.manifest, "-o", str(arc))
        t_install = cli("install", str(arc), "--cache", str(Path(tmp) / "node"))
        t_noop = cli("install", str(arc), "--cache", str(Path(tmp) / "node"))
        size = arc.stat().st_size
    res = {
        "manifest": args.manifest,
        "entries": len(entries),
        "blobs": len(seen),
        "payload_bytes": len(payload),
        "codecs": rows,
        "pack_s": t_pack,
        "install_s": t_install,
        "reinstall_s": t_noop,
        "archive_bytes": size,
    }
    print(f"{args.manifest}: {len(entries)} entries, {len(seen)} blobs, tar payload {len(payload) / 2**20:.1f} MiB")
    print(f"{'codec':<16}{'size':>12}{'ratio':>8}{'compress s':>12}{'decompress s':>14}")
    for r in rows:
        print(
            f"{r['codec']:<16}{r['bytes'] / 1024:>9.0f} KiB{r['ratio']:>8.1f}{r['compress_s']:>12.2f}{r['decompress_s']:>14.3f}"
        )
    print(
        f"fa4aot pack --manifest: {t_pack:.1f} s -> {size / 1024:.0f} KiB; install into an empty cache: "
        f"{t_install:.1f} s; again (nothing to add): {t_noop:.1f} s (fresh processes, imports included)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
