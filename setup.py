"""The one compiled part of fa4aot: the optional Python -> C hop of a launch (fa4aot/plan/_hop.c).

Everything else is in pyproject.toml. ``optional=True``: without a C compiler the install goes on
and the runtime launches through ctypes instead (0.18 us more a launch on the 2-core CI box:
benchmarks/hop.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fa4aot.plan._hop",
            ["fa4aot/plan/_hop.c"],
            optional=True,
            py_limited_api=True,  # abi3: one build per host arch serves every CPython >= 3.10
            define_macros=[("Py_LIMITED_API", "0x030A0000")],
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
