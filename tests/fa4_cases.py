"""The call descriptions the tests and FA4 oracle subprocesses share (see fa4aot.tools.fa4_calls)."""

from fa4aot.tools.fa4_calls import TORCH_DTYPES, decide, fa4_forward, facts

__all__ = ["TORCH_DTYPES", "decide", "facts", "fa4_forward"]
