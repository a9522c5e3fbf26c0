"""The Python -> C hop of one launch, without a GPU: fa4aot's compiled hop against ctypes (CPU).

    python benchmarks/hop.py [--json out.json]

What a bound launch costs before the driver is reached, on this machine's CPU: writing the
per-call words (four tensor addresses) and the stream into a call block and calling a C function
that takes the block. The function is libc's ``strlen`` on an empty string (a C call that does
nothing), so the rows are the hop alone:

* ctypes: ``struct.pack_into`` of the words, then the CFUNCTYPE call (the runtime without the hop);
* compiled hop: ``_hop.launch(fn, block, *words, stream)`` (fa4aot/plan/_hop.c);
* the call alone: the CFUNCTYPE call against ``_hop.run(fn, block)`` (the full launcher's hop).

Medians of ``--repeats`` batches of ``--inner`` calls. The shim's own work and the driver's
``cuLaunchKernelEx`` come on top (benchmarks/host_overhead.py, GPU).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import struct

import _common

from fa4aot.plan import library
from fa4aot.plan.abi import CALL_PTRS_OFFSET, MAX_PTRS, CallBlock

#: four tensor addresses, as a batched forward's bound call writes them
WORDS = (0x7F30_0000_0000, 0x7F30_0010_0000, 0x7F30_0020_0000, 0x7F30_0030_0000)


def run(inner: int, repeats: int) -> dict[str, float]:
    """Median microseconds per call of each row."""
    hop = library.HOP
    if hop is None:
        raise SystemExit("fa4aot.plan._hop is not built (or FA4AOT_HOP=0): reinstall with a C compiler")
    libc = ctypes.CDLL(None)
    fn = ctypes.cast(libc.strlen, ctypes.c_void_p).value
    block = CallBlock()  # all zero: strlen reads an empty string at its first byte
    addr = ctypes.addressof(block)
    call = library._RUN_T(fn)
    pack = struct.Struct(f"<{len(WORDS)}Q{(MAX_PTRS - len(WORDS)) * 8}xQ").pack_into
    w0, w1, w2, w3 = WORDS

    def with_ctypes():
        pack(block, CALL_PTRS_OFFSET, w0, w1, w2, w3, 0)
        call(addr)

    rows = {
        "bound launch, ctypes (struct.pack_into + CFUNCTYPE call)": with_ctypes,
        "bound launch, compiled hop (_hop.launch)": lambda: hop.launch(fn, addr, w0, w1, w2, w3, 0),
        "call only, ctypes (CFUNCTYPE call)": lambda: call(addr),
        "call only, compiled hop (_hop.run)": lambda: hop.run(fn, addr),
        "an empty Python call (for reference)": lambda: None,
    }
    return {k: _common.median_us(f, inner, repeats, warmup=1000) for k, f in rows.items()}


def _cpu_model() -> str:
    """The CPU's model name (Linux), else ''."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = run(args.inner, args.repeats)
    cpu = f"{platform.machine()} {_cpu_model()}".strip()
    print(f"CPU: {cpu}, Python {platform.python_version()}; median of {args.repeats} x {args.inner} calls")
    for k, v in rows.items():
        print(f"{k:<60} {v:>7.3f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "python": platform.python_version(), "us": rows}, f, indent=1)


if __name__ == "__main__":
    main()
