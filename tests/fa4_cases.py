"""The call descriptions the tests and FA4 oracle subprocesses share (see fa4aot.tools.fa4_calls)."""

from fa4aot.tools.fa4_calls import TORCH_DTYPES, fa4_forward, fa4aot_call

__all__ = ["TORCH_DTYPES", "fa4_forward", "fa4aot_call"]
