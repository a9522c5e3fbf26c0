"""A scripted "model" for the record tests: the calls of ``CASES`` (a JSON file of fa4aot.tools.fa4_calls
dicts) made through FA4's own interface on fake tensors (``fa4``), or through fa4aot's API on
raw pointers with the fake driver (``fa4aot CACHE``).

    python tests/record_workload.py fa4 cases.json
    python tests/record_workload.py fa4aot cases.json CACHE
"""

from __future__ import annotations

import json
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)


def main() -> None:
    api, cases = sys.argv[1], json.load(open(sys.argv[2]))
    if api == "fa4":
        import torch
        from fa4aot_kernels.common import install_target_hardware
        from torch._subclasses.fake_tensor import FakeTensorMode

        from fa4aot.tools.fa4_calls import fa4_forward

        install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
        from flash_attn.cute import interface

        for case in cases:
            with FakeTensorMode():
                fa4_forward(interface, torch, case)
        return
    from fake_driver import FakeDriver
    from test_dispatch import _fa4aot_call

    from fa4aot.runtime.loader import Runtime

    arch = os.environ["FLASH_ATTENTION_ARCH"]
    sms = int(os.environ["FLASH_ATTENTION_NUM_SMS"])
    rt = Runtime(sys.argv[3], driver=FakeDriver(cc=(10, 0) if arch == "sm_100a" else (9, 0), num_sms=sms))
    missing: list = []
    for case in cases:
        _fa4aot_call(rt, case, missing)
    print(f"{len(missing)} missing", file=sys.stderr)


if __name__ == "__main__":
    main()
