"""Launch plans: call a variant's exported FA4 host code through ctypes and read back its launch.

A plan library is the DSL's exported host object linked with ``fa4aot/plan/shim.c``. Calling its
entry with real pointers, shapes, strides and scalars runs FA4's own host logic; the shim records
the launch(es) it would make - kernel, grid, block, dynamic smem, launch attributes, and the
kernel parameter bytes laid out as the cubin's parameter table says - and, when asked, launches
them with ``cuLaunchKernelEx`` from C.

Three ways to call a plan:

* :meth:`Plan.plan` - validate named arguments, run the host code, return the recorded launches
  (no GPU; the build's self-test, ``fa4aot launch-plan``, the tests);
* :meth:`Plan.launcher` - a generated function taking argument values in a fixed order that
  packs them and makes one foreign call (plan + launch): the runtime's per-call path;
* :meth:`Plan.bind` - a :class:`BoundCall` with every argument fixed but the tensor addresses and
  the stream (prepared calls).

Run-time module: ctypes and the standard library only (and, where pip built it, fa4aot's
compiled hop ``_hop``, which makes the per-call foreign call of the last two without ctypes).
Each thread gets its own shim state, argument buffer and call block, so one plan may be called
from several threads at once.
"""

from __future__ import annotations

import _ctypes
import ctypes
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from fa4aot.core import env, gencode
from fa4aot.core.errors import ArgumentError, LaunchError, PlanError
from fa4aot.core.signature import COMPACT, Arg, ScalarArg, StreamArg, TensorArg, arg_from_dict
from fa4aot.plan.abi import (
    ATTR_CLUSTER_DIMENSION,
    ATTR_NAMES,
    CALL_PTRS_OFFSET,
    DEV_ATTR_MAX_SMEM_OPTIN,
    FAKE_LIBRARY_HANDLE,
    FUNC_ATTR_SHARED_SIZE_BYTES,
    MAX_ANSWERS,
    MAX_KERNELS,
    MAX_PARAMS,
    MAX_PTRS,
    SHIM_ABI,
    CallBlock,
    LaunchRecord,
    State,
    struct_layout,
)

_RUN_T = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p)


def _load_hop() -> Any:
    """fa4aot's compiled hop (fa4aot/plan/_hop.c: one C call writes a launch's per-call words and
    calls the shim), or None: not built (no C compiler at install) or turned off ($FA4AOT_HOP=0).
    Without it launches go through ctypes: a struct.pack_into and a foreign call, 0.18 us more on the
    2-core CI box (benchmarks/hop.py)."""
    if not env.hop():
        return None
    try:
        from fa4aot.plan import _hop
    except ImportError:
        return None
    _hop.layout(CALL_PTRS_OFFSET, CallBlock.stream.offset, MAX_PTRS, ArgumentError)
    return _hop


#: the compiled hop, or None (ctypes)
HOP = _load_hop()


class KernelTable(NamedTuple):
    """One kernel of a cubin: its symbol and parameter table (ordinal order)."""

    name: str
    param_offsets: tuple[int, ...]
    param_sizes: tuple[int, ...]
    param_bytes: int

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> KernelTable:
        params = sorted(meta["params"], key=lambda p: p[0])
        if [p[0] for p in params] != list(range(len(params))):
            raise PlanError(f"kernel {meta['symbol']}: parameter ordinals are not 0..n-1")
        return cls(
            meta["symbol"],
            tuple(p[1] for p in params),
            tuple(p[2] for p in params),
            int(meta["cbank_param_size"]),
        )


class Launch(NamedTuple):
    """One launch a plan recorded."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int
    attributes: dict[int, bytes]
    param_bytes: bytes

    @property
    def cluster(self) -> tuple[int, int, int] | None:
        raw = self.attributes.get(ATTR_CLUSTER_DIMENSION)
        if raw is None:
            return None
        return struct.unpack_from("<3I", raw)  # type: ignore[return-value]

    def attribute_values(self) -> dict[str, Any]:
        """Launch attributes decoded by name (cluster as a tuple, flags as ints)."""
        out: dict[str, Any] = {}
        for aid, raw in self.attributes.items():
            name = ATTR_NAMES.get(aid, f"attr_{aid}")
            out[name] = self.cluster if aid == ATTR_CLUSTER_DIMENSION else struct.unpack_from("<i", raw)[0]
        return out


class ModuleLoad(NamedTuple):
    """What a plan's module load did: lookups made and attributes it set (kernel, attr, value)."""

    library_loads: int
    kernel_lookups: int
    set_attributes: tuple[tuple[str, int, int], ...]


class _Scratch:
    """One thread's (or one bound call's) shim state, argument buffer, argv and call block."""

    __slots__ = ("state", "buf", "argv", "block", "addr")

    def __init__(self, plan: Plan, launch_fn: int, initial: bytes | None = None):
        if plan._template is None:
            raise PlanError("call Plan.load() before calling the plan")
        self.state = State()
        # copy the inputs (kernel tables, attribute answers) set up by load()
        ctypes.memmove(ctypes.addressof(self.state), ctypes.addressof(plan._template), ctypes.sizeof(State))
        size = plan._struct.size + (-plan._struct.size % 8)
        self.buf = ctypes.create_string_buffer(max(size, 8) + 8)
        if initial is not None:
            ctypes.memmove(self.buf, initial, len(initial))
        n = len(plan.signature)
        self.argv = (ctypes.c_void_p * (n + 1))()
        base = ctypes.addressof(self.buf)
        for i, off in enumerate(plan._offsets):
            self.argv[i] = base + off
        self.argv[n] = base + size  # the int32 return slot
        b = self.block = CallBlock()
        b.state = ctypes.addressof(self.state)
        b.entry = plan._entry
        b.argv = ctypes.addressof(self.argv)
        b.argbuf = base
        b.launch = launch_fn
        b.nargs = n + 1
        self.addr = ctypes.addressof(b)


def _open_library(path: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except OSError as e:
        raise PlanError(f"cannot load launch plan {path}: {e}") from None


def _close_library(lib: ctypes.CDLL) -> None:
    """dlclose a library that failed fa4aot's checks after dlopen. Without it the library stays
    mapped under its path, and the next dlopen of that path (a later plan's reused
    ``/proc/self/fd/N``) would return it instead of loading the new file."""
    try:
        _ctypes.dlclose(lib._handle)
    except OSError:  # nothing more to undo; the caller keeps the path from being reused
        pass


def _still_loaded(path: str) -> bool:
    """Whether the dynamic linker still holds a library under ``path`` (a library marked
    nodelete, or one another library depends on, survives dlclose)."""
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_NOLOAD)
    except OSError:
        return False
    _ctypes.dlclose(lib._handle)  # drop the reference RTLD_NOLOAD just took
    return True


class Plan:
    """A loaded launch-plan library for one variant.

    ``signature`` is the argument list recorded at build time; ``kernels`` the cubin's kernel
    tables; ``handles[i]`` is the value the plan's kernel lookup hands back for ``kernels[i]``
    (the runtime passes its real ``CUkernel`` handles; without a GPU any distinct non-zero
    integers do). Call :meth:`load` once, then :meth:`plan`, :meth:`launcher` or :meth:`bind`.
    """

    def __init__(
        self,
        library_path: str,
        signature: Sequence[Arg | Mapping[str, Any]],
        kernels: Sequence[KernelTable],
        entry_symbol: str,
        init_symbol: str,
        load_symbol: str,
    ):
        self.path = library_path
        self.signature: list[Arg] = [
            a if isinstance(a, (TensorArg, ScalarArg, StreamArg)) else arg_from_dict(a) for a in signature
        ]
        if not kernels or len(kernels) > MAX_KERNELS:
            raise PlanError(f"a plan needs 1..{MAX_KERNELS} kernels, got {len(kernels)}")
        self.kernels = list(kernels)
        for k in self.kernels:
            if len(k.name.encode()) >= 512 or len(k.param_sizes) > MAX_PARAMS:
                raise PlanError(f"kernel {k.name[:60]}...: name or parameter table too large for the shim")
        if sum(isinstance(a, TensorArg) for a in self.signature) > MAX_PTRS:
            raise PlanError(f"a plan takes at most {MAX_PTRS} tensors")
        # everything that can fail without the library is done before dlopen
        self._packer = _make_packer(self.signature)
        fmt, offsets = struct_layout(self.signature)
        self._struct = struct.Struct(fmt)
        self._offsets = offsets
        lib = self._lib = _open_library(library_path)
        try:
            self._bind_shim(lib, entry_symbol, init_symbol, load_symbol)
        except BaseException:
            _close_library(lib)  # a rejected library must not stay mapped under its path
            raise
        self._template: State | None = None
        self._launch_fn = 0
        self._local = threading.local()
        self._load_lock = threading.Lock()
        self.module_load: ModuleLoad | None = None
        self._handle_names: dict[int, str] = {}
        self.fd = -1
        #: successful foreign calls that launched (Runtime.stats() sums them per family): a plain int
        #: add per call, no lock on the launch path (threads launching one variant at the same
        #: instant can, rarely, lose an increment)
        self.launches = 0

    def _bind_shim(self, lib: ctypes.CDLL, entry_symbol: str, init_symbol: str, load_symbol: str) -> None:
        """Find the shim's and the entry's symbols in ``lib`` and check the shim ABI (PlanError if
        the library was not linked with this fa4aot's shim)."""
        library_path = self.path
        try:
            abi, state_size, launches_off, call_size = (
                lib.fa4aot_shim_abi,
                lib.fa4aot_shim_state_size,
                lib.fa4aot_shim_launches_offset,
                lib.fa4aot_shim_call_size,
            )
            self._load_fn = lib.fa4aot_shim_load
            self._call_fn = lib.fa4aot_shim_call
            #: the shim's two launch entries: addresses (for the hop) and ctypes functions
            self._run_addr = ctypes.cast(lib.fa4aot_shim_run, ctypes.c_void_p).value
            self._run_bound_addr = ctypes.cast(lib.fa4aot_shim_run_bound, ctypes.c_void_p).value
            self._run = _RUN_T(self._run_addr)
            self._run_bound = _RUN_T(self._run_bound_addr)
            self._entry = ctypes.cast(getattr(lib, entry_symbol), ctypes.c_void_p).value
            self._init = ctypes.cast(getattr(lib, init_symbol), ctypes.c_void_p).value
            self._loadsym = ctypes.cast(getattr(lib, load_symbol), ctypes.c_void_p).value
        except AttributeError as e:
            raise PlanError(f"launch plan {library_path} lacks a symbol (built by another fa4aot?): {e}") from None
        abi.restype = ctypes.c_uint32
        for f in (state_size, launches_off, call_size):
            f.restype = ctypes.c_size_t
        if (
            abi() != SHIM_ABI
            or state_size() != ctypes.sizeof(State)
            or launches_off() != State.launches.offset
            or call_size() != ctypes.sizeof(CallBlock)
        ):
            raise PlanError(f"launch plan {library_path} was linked with an incompatible shim ABI")
        self._load_fn.restype = ctypes.c_int32
        self._load_fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._call_fn.restype = ctypes.c_int32
        self._call_fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]

    # -- module load ---------------------------------------------------------------------

    def load(
        self,
        handles: Sequence[int],
        device_attrs: Mapping[int, int],
        kernel_attrs: Mapping[int, int],
        library_handle: int = FAKE_LIBRARY_HANDLE,
        device: int = 0,
        launch_fn: int = 0,
    ) -> ModuleLoad:
        """Run the plan's module load once and remember what it asked for.

        ``device_attrs`` / ``kernel_attrs`` answer the attribute queries (the real device's
        values, or the manifest target's without a GPU). ``launch_fn`` is the address of the
        driver's ``cuLaunchKernelEx`` (0: the plan only records). Later calls return the first result.
        """
        with self._load_lock:
            if self.module_load is not None:
                return self.module_load
            st = state_template(self.kernels, handles, device_attrs, kernel_attrs, library_handle, device)
            self._handle_names.update((h, k.name) for k, h in zip(self.kernels, handles))
            rc = self._load_fn(ctypes.byref(st), self._init, self._loadsym)
            if rc:
                raise PlanError(f"plan module load failed (cuda error {rc}): {st.error_msg.decode()}")
            self.module_load = module_load_of(st, self._handle_names)
            self._launch_fn = launch_fn
            self._template = st
            return self.module_load

    # -- named arguments -------------------------------------------------------------------

    def _scratch(self) -> _Scratch:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = _Scratch(self, self._launch_fn)
        return s

    def flatten(self, args: Sequence[Any]) -> list[Any]:
        """Validate positional ``args`` against the signature and flatten them to struct fields.

        Tensors are anything with ``ptr``, ``shape`` and ``strides`` (:class:`TensorDesc`); scalars
        numbers; the stream an int handle. A static mode whose value differs from the compiled
        one, a wrong rank or a wrong count raises :class:`ArgumentError` naming the argument.
        """
        if len(args) != len(self.signature):
            raise ArgumentError(
                f"plan takes {len(self.signature)} arguments "
                f"({', '.join(a.name for a in self.signature)}), got {len(args)}"
            )
        return self.pack(dict(zip((a.name for a in self.signature), args)))

    def pack(self, named: Mapping[str, Any]) -> list[Any]:
        """Flatten named arguments (exactly the signature's names) to struct fields, checking
        each tensor's rank and static modes."""
        if len(named) != len(self.signature):
            self.order(named)  # raises, naming the missing or extra argument
        try:
            return self._packer(named)
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            self.order(named)
            raise ArgumentError(f"malformed plan argument: {e}") from None

    def order(self, named: Mapping[str, Any]) -> list[Any]:
        """Order named arguments as the signature lists them; names the signature does not take
        must be absent or None, and every name it takes must be given."""
        names = {a.name for a in self.signature}
        missing = [a.name for a in self.signature if named.get(a.name) is None and a.kind != "stream"]
        if missing:
            raise ArgumentError(f"this variant needs {', '.join(missing)}")
        extra = sorted(k for k, v in named.items() if v is not None and k not in names)
        if extra:
            raise ArgumentError(f"this variant takes no {', '.join(extra)} (a different variant does)")
        return [named.get(a.name) for a in self.signature]

    def _packed(self, s: _Scratch, flat: Sequence[Any]) -> None:
        try:
            self._struct.pack_into(s.buf, 0, *flat)
        except struct.error as e:
            raise ArgumentError(f"argument out of range for the plan's C types: {e}") from None

    def call(self, flat: Sequence[Any], pattern: int = -1) -> State:
        """Run the entry with already-flattened arguments; returns this thread's shim state
        (valid until this thread's next call). ``pattern`` >= 0 poisons the stack first."""
        s = self._scratch()
        self._packed(s, flat)
        rc = self._call_fn(ctypes.byref(s.state), self._entry, s.argv, len(s.argv), pattern)
        if rc:
            raise PlanError(f"plan call failed (cuda error {rc}): {s.state.error_msg.decode() or 'host code error'}")
        return s.state

    def call_launch(self, flat: Sequence[Any]) -> int:
        """Run the entry with flattened arguments and launch what it recorded; one foreign call.
        Returns the number of launches; raises PlanError (nothing launched) or LaunchError."""
        s = self._scratch()
        self._packed(s, flat)
        self._check(self._run(s.addr), s.state)
        self.launches += 1
        return s.state.n_launches

    @staticmethod
    def _check(rc: int, state: State) -> None:
        if rc:
            if state.launch_error:
                raise LaunchError(f"cuLaunchKernelEx failed with CUresult {state.launch_error}", state.launch_error)
            raise PlanError(f"plan call failed (cuda error {rc}): {state.error_msg.decode() or 'host code error'}")

    def plan(self, args: Sequence[Any], pattern: int = -1) -> list[Launch]:
        """Validate ``args``, run FA4's host code, and return the launch(es) it would make."""
        st = self.call(self.flatten(args), pattern)
        return [self._launch(st.launches[i]) for i in range(st.n_launches)]

    def _launch(self, rec: LaunchRecord) -> Launch:
        return launch_of(rec, self._handle_names)

    # -- the fast paths ----------------------------------------------------------------------

    def launcher(
        self, order: Sequence[str], optional: Sequence[str] = (), ranks_checked: bool = False
    ) -> Callable[..., None]:
        """A function ``f(*values)`` taking a value per name of ``order`` (a superset of the
        signature's names; names this plan does not take must be None, except ``optional`` ones,
        which are ignored) that packs them and makes one foreign call: FA4's host code, then
        ``cuLaunchKernelEx``. Tensors are tuples whose first three items are address, shape and
        strides (``TensorDesc``, ``DeviceTensor``). ``ranks_checked``: the caller has checked every
        tensor's rank, so only compiled static modes are checked here."""
        if self._template is None or not self._launch_fn:
            raise PlanError("load the plan with a launch function before asking for a launcher")
        return _make_launcher(self, list(order), set(optional), ranks_checked)

    def bind(self, named: Mapping[str, Any], words: Sequence[tuple[str, int | None]] = ()) -> BoundCall:
        """Fix every argument but the tensor addresses, the stream and ``words`` (32-bit values
        written per call: see :meth:`BoundCall.word_offset`)."""
        return BoundCall(self, named, words)

    # -- errors (slow path) --------------------------------------------------------------------

    def _explain(self, values: Mapping[str, Any], error: Exception) -> ArgumentError:
        self.order(values)
        try:
            self._packer(values)
        except ArgumentError as e:
            return e
        except Exception as e:
            return ArgumentError(f"malformed plan argument: {e}")
        return ArgumentError(f"argument out of range for the plan's C types: {error}")


class BoundCall:
    """A plan call with every argument fixed except the tensor addresses, the stream and any
    per-call words (a sequence count, a max_seqlen: see :meth:`word_offset`).

    Per call: write the addresses (in the signature's tensor order), the words and the stream into
    the call block and make one foreign call, which runs FA4's host code (or, when the addresses
    and words equal the last call's, reuses its launch) and launches. Each thread gets its own
    copy of the shim state and argument buffer, so a bound call may be shared by threads.
    """

    def __init__(self, plan: Plan, named: Mapping[str, Any], words: Sequence[tuple[str, int | None]] = ()):
        if plan._template is None or not plan._launch_fn:
            raise PlanError("load the plan with a launch function before binding it")
        self.plan = plan
        flat = plan.pack(named)
        buf = ctypes.create_string_buffer(plan._struct.size)
        try:
            plan._struct.pack_into(buf, 0, *flat)
        except struct.error as e:
            raise ArgumentError(f"argument out of range for the plan's C types: {e}") from None
        self._initial = buf.raw
        tensors = [i for i, a in enumerate(plan.signature) if isinstance(a, TensorArg)]
        self.tensor_names = tuple(plan.signature[i].name for i in tensors)
        self._ptr_offsets = [plan._offsets[i] for i in tensors]
        #: per word: the bytes above its 32-bit field in its 8-byte slot, as bound (see word_offset)
        self.word_highs: tuple[int, ...] = ()
        for name, dim in words:
            off = self.word_offset(name, dim)
            self._ptr_offsets.append(off)
            self.word_highs += (int.from_bytes(self._initial[off + 4 : off + 8], "little") << 32,)
        if len(self._ptr_offsets) > MAX_PTRS:
            raise PlanError(f"a bound call writes at most {MAX_PTRS} addresses and words per call")
        streams = [i for i, a in enumerate(plan.signature) if isinstance(a, StreamArg)]
        if len(streams) != 1:
            raise PlanError("a bound call needs a plan with exactly one stream argument")
        self._stream_offset = plan._offsets[streams[0]]
        n = len(self._ptr_offsets)
        self.pack_into = struct.Struct(f"<{n}Q{(MAX_PTRS - n) * 8}xQ").pack_into
        self.run = plan._run_bound
        #: with the compiled hop: ``hop(run_addr, block_addr, *words, stream)`` does pack_into and
        #: run in one C call (None: ctypes)
        self.hop = HOP.launch if HOP is not None else None
        self.run_addr = plan._run_bound_addr
        self._local = threading.local()

    def word_offset(self, name: str, dim: int | None) -> int:
        """Where a per-call 32-bit value goes in the packed arguments: the scalar ``name``
        (``dim`` None), or the dynamic extent ``dim`` of tensor ``name``. Each per-call word is
        written as 8 bytes (the shim's address slots): the value, then the 4 bytes that follow it
        as bound (a scalar's padding, a neighbouring extent), kept in :attr:`word_highs`."""
        sig = self.plan.signature
        i = next((j for j, a in enumerate(sig) if a.name == name), None)
        if i is None:
            raise PlanError(f"the plan takes no argument {name!r}")
        a, off = sig[i], self.plan._offsets[i]
        if isinstance(a, ScalarArg) and dim is None and a.ctype == "i32":
            return off
        if isinstance(a, TensorArg) and dim in range(len(a.shape)) and a.shape_bits == 32 and a.shape[dim] is None:
            return off + 8 + 4 * sum(x is None for x in a.shape[:dim])  # after the address
        raise PlanError(f"{name}{'' if dim is None else f'[{dim}]'} is not a 32-bit value the plan reads per call")

    def scratch(self) -> _Scratch:
        """This thread's call block (its ``addr`` is what :attr:`run` takes)."""
        s = getattr(self._local, "s", None)
        if s is None:
            s = _Scratch(self.plan, self.plan._launch_fn, self._initial)
            b = s.block
            b.n_ptrs = len(self._ptr_offsets)
            for i, off in enumerate(self._ptr_offsets):
                b.ptr_offset[i] = off
            b.stream_offset = self._stream_offset
            self._local.s = s
        return s

    def __call__(self, ptrs: Sequence[int], stream: int) -> None:
        """Launch with these tensor addresses (signature order) on ``stream``."""
        s = self.scratch()
        if self.hop is not None:
            rc = self.hop(self.run_addr, s.addr, *ptrs, stream)
        else:
            try:
                self.pack_into(s.block, CALL_PTRS_OFFSET, *ptrs, stream)
            except struct.error as e:
                raise ArgumentError(f"a tensor address or the stream is not a valid pointer: {e}") from None
            rc = self.run(s.addr)
        Plan._check(rc, s.state)
        self.plan.launches += 1


def _make_packer(signature: Sequence[Arg]) -> Callable[[Mapping[str, Any]], list[Any]]:
    """Generate ``pack(named) -> list`` for a signature: straight-line code, one line per field."""
    lines = ["def pack(a):", "    out = []"]
    for spec in signature:
        n = spec.name
        if isinstance(spec, TensorArg):
            lines += [f"    t = a[{n!r}]", "    s = t.shape", "    st = t.strides"]
            lines += _tensor_checks(spec, "s", "st")
            fields = ["t.ptr"] + [f"s[{i}]" for i, v in enumerate(spec.shape) if v is None]
            fields += [f"st[{i}]" for i, v in enumerate(spec.stride) if v is None or v == COMPACT]
            lines.append(f"    out += ({', '.join(fields)},)")
        elif isinstance(spec, ScalarArg):
            lines.append(f"    v = a[{n!r}]")
            if spec.ctype == "f32":
                lines.append(
                    f"    if v.__class__ not in (float, int): raise ArgumentError(f'{n}: expected a float, got {{v!r}}')"
                )
                lines.append("    out.append(float(v))")
            else:
                lines.append(
                    f"    if v.__class__ is not int: raise ArgumentError(f'{n}: expected an int, got {{v!r}}')"
                )
                lines.append("    out.append(v)")
        else:
            lines.append(f"    out.append(a.get({n!r}) or 0)")
    lines.append("    return out")
    scope: dict[str, Any] = {"ArgumentError": ArgumentError}
    gencode.run("\n".join(lines), scope, "packer")
    return scope["pack"]


def _tensor_checks(spec: TensorArg, s: str, st: str) -> list[str]:
    """Rank and static-mode checks of one tensor (its shape in ``s``, strides in ``st``)."""
    n = spec.name
    lines = [
        f"    if len({s}) != {spec.rank} or len({st}) != {spec.rank}: "
        f"raise ArgumentError(f'{n}: expected rank {spec.rank}, got shape {{tuple({s})}}')"
    ]
    for i, v in enumerate(spec.shape):
        if v is not None:
            lines.append(
                f"    if {s}[{i}] != {v}: raise ArgumentError(f'{n}: mode {i} is compiled as {v}, got {{{s}[{i}]}}')"
            )
    for i, v in enumerate(spec.stride):
        if v == COMPACT:  # row-major compact: the stride is the product of the inner extents
            inner = " * ".join(f"{s}[{j}]" for j in range(i + 1, spec.rank)) or "1"
            lines.append(
                f"    if {st}[{i}] != {inner} and {s}[{i}] != 1: "
                f"raise ArgumentError(f'{n}: must be contiguous (row-major), got strides {{tuple({st})}}')"
            )
        elif v is not None:
            lines.append(
                f"    if {st}[{i}] != {v} and {s}[{i}] != 1: "
                f"raise ArgumentError(f'{n}: stride {i} must be {v}, got {{{st}[{i}]}}')"
            )
    return lines


def _make_launcher(plan: Plan, order: list[str], optional: set[str], ranks_checked: bool) -> Callable[..., None]:
    """Generate the per-call fast path of :meth:`Plan.launcher`."""
    sig = {a.name: a for a in plan.signature}
    missing = [n for n in sig if n not in order]
    if missing:
        raise PlanError(f"launcher order lacks {missing}")
    params = ", ".join(order)
    body = [
        "    s = _local.__dict__.get('s')",
        "    if s is None: s = _plan._scratch()",
    ]
    for name in order:
        if name not in sig and name not in optional:
            body.append(f"    if {name} is not None: raise _extra({name!r})")
    fields: list[str] = []
    checks: list[str] = []
    for spec in plan.signature:
        n = spec.name
        if isinstance(spec, TensorArg):
            checks.append(f"    {n}_s = {n}[1]; {n}_st = {n}[2]")
            checks += _tensor_checks(spec, f"{n}_s", f"{n}_st")[1 if ranks_checked else 0 :]
            fields.append(f"{n}[0]")
            fields += [f"{n}_s[{i}]" for i, v in enumerate(spec.shape) if v is None]
            fields += [f"{n}_st[{i}]" for i, v in enumerate(spec.stride) if v is None or v == COMPACT]
        elif isinstance(spec, ScalarArg):
            fields.append(n)
        else:
            fields.append(f"({n} or 0)")
    names_dict = "{" + ", ".join(f"{n!r}: {n}" for n in order if n in sig or n not in optional) + "}"
    body += ["    try:"]
    body += ["    " + c for c in checks]
    body += [
        f"        _pack(s.buf, 0, {', '.join(fields)})",
        "    except (TypeError, IndexError, _struct_error) as e:",
        f"        raise _plan._explain({names_dict}, e) from None",
        "    rc = _run(s.addr)" if HOP is None else "    rc = _hop_run(_run_addr, s.addr)",
        "    if rc: _check(rc, s.state)",
        "    _plan.launches += 1",
    ]
    src = f"def launch({params}):\n" + "\n".join(body)
    scope: dict[str, Any] = {
        "ArgumentError": ArgumentError,
        "_plan": plan,
        "_local": plan._local,
        "_pack": plan._struct.pack_into,
        "_struct_error": struct.error,
        "_run": plan._run,
        "_hop_run": HOP.run if HOP is not None else None,
        "_run_addr": plan._run_addr,
        "_check": Plan._check,
        "_extra": lambda n: ArgumentError(f"this variant takes no {n} (a different variant does)"),
    }
    gencode.run(src, scope, "launcher")
    return scope["launch"]


def state_template(
    kernels: Sequence[KernelTable],
    handles: Sequence[int],
    device_attrs: Mapping[int, int],
    kernel_attrs: Mapping[int, int],
    library_handle: int = FAKE_LIBRARY_HANDLE,
    device: int = 0,
) -> State:
    """A shim state holding a module load's inputs: the kernel tables with their handles and the
    attribute answers (what :meth:`Plan.load` and the emulated plan runner start from)."""
    if len(handles) != len(kernels) or len(set(handles)) != len(handles) or 0 in handles:
        raise PlanError("need one distinct non-zero handle per kernel")
    st = State()
    st.abi = SHIM_ABI
    st.device = device
    st.library_handle = library_handle
    st.n_kernels = len(kernels)
    for i, (k, h) in enumerate(zip(kernels, handles)):
        ki = st.kernels[i]
        ki.name = k.name.encode()
        ki.handle = h
        ki.n_params = len(k.param_sizes)
        ki.param_bytes = k.param_bytes
        for j, (off, size) in enumerate(zip(k.param_offsets, k.param_sizes)):
            ki.param_offset[j] = off
            ki.param_size[j] = size
    for table, count, answers in (
        (st.device_answers, "n_device_answers", device_attrs),
        (st.kernel_answers, "n_kernel_answers", kernel_attrs),
    ):
        if len(answers) > MAX_ANSWERS:
            raise PlanError("too many attribute answers")
        for i, (attr, value) in enumerate(answers.items()):
            table[i].attr = attr
            table[i].value = value
        setattr(st, count, len(answers))
    return st


def module_load_of(st: State, names: Mapping[int, str]) -> ModuleLoad:
    """What a module load recorded in ``st`` (kernel handles named by ``names``)."""
    sets = tuple(
        (names.get(st.setattrs[i].kernel, hex(st.setattrs[i].kernel)), st.setattrs[i].attr, st.setattrs[i].value)
        for i in range(st.n_setattrs)
    )
    return ModuleLoad(st.n_library_loads, st.n_kernel_lookups, sets)


def launch_of(rec: LaunchRecord, names: Mapping[int, str]) -> Launch:
    """One recorded launch (kernel handles named by ``names``)."""
    return Launch(
        kernel=names.get(rec.kernel, hex(rec.kernel)),
        grid=tuple(rec.grid),  # type: ignore[arg-type]
        block=tuple(rec.block),  # type: ignore[arg-type]
        smem=rec.smem,
        attributes={rec.attr_id[i]: bytes(rec.attr_val[i]) for i in range(rec.n_attrs)},
        param_bytes=bytes(rec.params[: rec.param_bytes]),
    )


def target_answers(smem_optin: int, static_smem: int = 0) -> tuple[dict[int, int], dict[int, int]]:
    """Attribute answers for a plan's module load on a machine without the GPU."""
    return {DEV_ATTR_MAX_SMEM_OPTIN: smem_optin}, {FUNC_ATTR_SHARED_SIZE_BYTES: static_smem}


def open_plan(library_bytes: bytes, meta: Mapping[str, Any]) -> Plan:
    """Load a plan from verified bytes (its sha256 already checked by the caller).

    The bytes go into an anonymous memory file, sealed against writes, that is then loaded: what
    runs is exactly what was hashed, even if the file in the cache changes afterwards, and nothing
    is written to disk (read-only caches work).
    """
    sig = meta["signature"]
    kernels = [KernelTable.from_meta(k) for k in meta["kernels"]]
    fd = os.memfd_create("fa4aot-plan", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    path = f"/proc/self/fd/{fd}"
    try:
        view = memoryview(library_bytes)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        )
        # The fd stays open for the life of the process: dlopen matches libraries by path, and a
        # closed fd's /proc/self/fd/N name would be reused by the next plan.
        plan = Plan(path, sig["args"], kernels, sig["entry"], sig["init"], sig["load"])
    except BaseException:
        # A library that failed after dlopen was dlclosed; if the linker still holds it (nodelete),
        # the fd stays open too, so no later plan is ever handed this stale library by path.
        if not _still_loaded(path):
            os.close(fd)
        raise
    plan.fd = fd
    return plan
