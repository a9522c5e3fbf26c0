"""Grow a copy of a built cache to N entries for start-up benchmarks (CPU; needs the cli extra).

    python benchmarks/synth_cache.py SRC DST --entries 1000

The added entries are clones of SRC's records whose variant carries an extra ``synthetic`` field
(so each has its own variant id and key) and whose blobs are the cloned entry's own: real, valid
records the runtime indexes but that no call ever asks for. They measure what opening a large
cache costs, not loading; say so wherever the numbers are quoted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fa4aot.compile.store import CacheWriter  # noqa: E402
from fa4aot.core.variant import Variant, cache_key  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--entries", type=int, default=1000)
    args = ap.parse_args()
    if Path(args.dst).exists():
        sys.exit(f"{args.dst} exists; pick a new directory")
    shutil.copytree(args.src, args.dst)
    cache = CacheWriter(args.dst)
    records = list(cache.records())
    i = 0
    while len(records) + i < args.entries:
        key, text = records[i % len(records)]
        meta = json.loads(text)
        v = Variant.from_dict(meta["variant"])
        v = Variant.make(v.family, v.arch, v.num_sms, **dict(v.fields, synthetic=i))
        meta["variant"] = v.to_dict()
        blobs = {role: cache.blob_path(ref).read_bytes() for role, ref in cache.get(key).blobs.items()}
        cache.put(cache_key(v, meta["toolchain"], meta["host_arch"]), meta, blobs)
        i += 1
    written = cache.write_packed()
    cache.close()
    print(f"{args.dst}: {len(records) + i} entries ({i} synthetic); packed {[p.name for p in written]}")


if __name__ == "__main__":
    main()
