"""Launch plans: call a variant's exported FA4 host code through ctypes and read back its launch.

A plan library is the DSL's exported host object linked with ``fa4aot/plan/shim.c``. Calling its
entry with real pointers, shapes, strides and scalars runs FA4's own host logic; the shim records
the launch(es) it would make - kernel, grid, block, dynamic smem, launch attributes, and the
kernel parameter bytes laid out as the cubin's parameter table says - and launches nothing.

Run-time module: ctypes and the standard library only. Each thread gets its own shim state and
argument buffer, so one plan may be called from several threads at once.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fa4aot.core.errors import ArgumentError, LaunchError, PlanError
from fa4aot.core.signature import Arg, ScalarArg, StreamArg, TensorArg, arg_from_dict
from fa4aot.plan.abi import struct_layout

SHIM_ABI = 2
MAX_KERNELS = 4
MAX_PARAMS = 64
MAX_PARAM_BYTES = 4096
MAX_LAUNCHES = 4
MAX_ATTRS = 8
MAX_ANSWERS = 8
MAX_SETATTRS = 16

#: cudaLaunchAttributeID values that plans are known to record.
ATTR_COOPERATIVE = 2
ATTR_CLUSTER_DIMENSION = 4
ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6
ATTR_NAMES = {
    ATTR_COOPERATIVE: "cooperative",
    ATTR_CLUSTER_DIMENSION: "cluster_dim",
    ATTR_PROGRAMMATIC_STREAM_SERIALIZATION: "programmatic_stream_serialization",
}
#: Attribute queries a plan's module load makes, and how we answer them.
DEV_ATTR_MAX_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin
FUNC_ATTR_SHARED_SIZE_BYTES = 1  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES (static smem)
FUNC_ATTR_MAX_DYNAMIC_SMEM = 8
FUNC_ATTR_NON_PORTABLE_CLUSTER = 14

_u32, _i32, _u64 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64


class _KernelInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 512),
        ("handle", _u64),
        ("n_params", _u32),
        ("param_bytes", _u32),
        ("param_offset", _u32 * MAX_PARAMS),
        ("param_size", _u32 * MAX_PARAMS),
    ]


class _Answer(ctypes.Structure):
    _fields_ = [("attr", _i32), ("value", _i32)]


class _SetAttr(ctypes.Structure):
    _fields_ = [("kernel", _u64), ("attr", _i32), ("value", _i32), ("device", _i32), ("pad", _i32)]


class _Launch(ctypes.Structure):
    _fields_ = [
        ("kernel", _u64),
        ("grid", _u32 * 3),
        ("block", _u32 * 3),
        ("smem", _u64),
        ("stream", _u64),
        ("n_attrs", _u32),
        ("param_bytes", _u32),
        ("attr_id", _u32 * MAX_ATTRS),
        ("attr_val", (ctypes.c_uint8 * 64) * MAX_ATTRS),
        ("params", ctypes.c_uint8 * MAX_PARAM_BYTES),
    ]


class _State(ctypes.Structure):
    _fields_ = [
        ("abi", _u32),
        ("device", _i32),
        ("library_handle", _u64),
        ("n_kernels", _u32),
        ("n_device_answers", _u32),
        ("n_kernel_answers", _u32),
        ("pad0", _u32),
        ("kernels", _KernelInfo * MAX_KERNELS),
        ("device_answers", _Answer * MAX_ANSWERS),
        ("kernel_answers", _Answer * MAX_ANSWERS),
        ("n_library_loads", _u32),
        ("n_kernel_lookups", _u32),
        ("n_launches", _u32),
        ("n_setattrs", _u32),
        ("error", _i32),
        ("launch_error", _i32),
        ("error_msg", ctypes.c_char * 256),
        ("setattrs", _SetAttr * MAX_SETATTRS),
        ("launches", _Launch * MAX_LAUNCHES),
    ]


@dataclass(frozen=True)
class KernelTable:
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


@dataclass(frozen=True)
class Launch:
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


@dataclass(frozen=True)
class ModuleLoad:
    """What a plan's module load did: lookups made and attributes it set (kernel, attr, value)."""

    library_loads: int
    kernel_lookups: int
    set_attributes: tuple[tuple[str, int, int], ...]


def _open_library(path: str) -> ctypes.CDLL:
    mode = os.RTLD_NOW | os.RTLD_LOCAL
    try:
        return ctypes.CDLL(path, mode=mode)
    except OSError as e:
        raise PlanError(f"cannot load launch plan {path}: {e}") from None


class Plan:
    """A loaded launch-plan library for one variant.

    ``signature`` is the argument list recorded at build time; ``kernels`` the cubin's kernel
    tables; ``handles[i]`` is the value the plan's kernel lookup hands back for ``kernels[i]``
    (the runtime passes its real ``CUkernel`` handles; without a GPU any distinct non-zero
    integers do). Call :meth:`load` once, then :meth:`plan` (or the lower-level :meth:`call`).
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
        self._lib = _open_library(library_path)
        try:
            self._abi = self._lib.fa4aot_shim_abi
            state_size = self._lib.fa4aot_shim_state_size
            launches_off = self._lib.fa4aot_shim_launches_offset
            self._load_fn = self._lib.fa4aot_shim_load
            self._call_fn = self._lib.fa4aot_shim_call
            self._entry = ctypes.cast(getattr(self._lib, entry_symbol), ctypes.c_void_p).value
            self._init = ctypes.cast(getattr(self._lib, init_symbol), ctypes.c_void_p).value
            self._loadsym = ctypes.cast(getattr(self._lib, load_symbol), ctypes.c_void_p).value
        except AttributeError as e:
            raise PlanError(f"launch plan {library_path} lacks a symbol: {e}") from None
        self._abi.restype = _u32
        state_size.restype = ctypes.c_size_t
        launches_off.restype = ctypes.c_size_t
        if self._abi() != SHIM_ABI or state_size() != ctypes.sizeof(_State) or launches_off() != _State.launches.offset:
            raise PlanError(f"launch plan {library_path} was linked with an incompatible shim ABI")
        self._load_fn.restype = _i32
        self._load_fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._call_fn.restype = _i32
        self._call_fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _i32, _i32]
        self._call_launch_fn = self._lib.fa4aot_shim_call_launch
        self._call_launch_fn.restype = _i32
        self._call_launch_fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _i32, ctypes.c_void_p]
        self._packer = _make_packer(self.signature)
        fmt, offsets = struct_layout(self.signature)
        self._struct = struct.Struct(fmt)
        self._offsets = offsets
        self._template: _State | None = None
        self._local = threading.local()
        self._load_lock = threading.Lock()
        self.module_load: ModuleLoad | None = None
        self._handle_names: dict[int, str] = {}

    # -- module load ---------------------------------------------------------------------

    def load(
        self,
        handles: Sequence[int],
        device_attrs: Mapping[int, int],
        kernel_attrs: Mapping[int, int],
        library_handle: int = 0x1B,
        device: int = 0,
    ) -> ModuleLoad:
        """Run the plan's module load once and remember what it asked for.

        ``device_attrs`` / ``kernel_attrs`` answer the attribute queries (the real device's
        values, or the manifest target's without a GPU). Subsequent calls return the first result.
        """
        with self._load_lock:
            if self.module_load is not None:
                return self.module_load
            if len(handles) != len(self.kernels) or len(set(handles)) != len(handles) or 0 in handles:
                raise PlanError("need one distinct non-zero handle per kernel")
            st = _State()
            st.abi = SHIM_ABI
            st.device = device
            st.library_handle = library_handle
            st.n_kernels = len(self.kernels)
            for i, (k, h) in enumerate(zip(self.kernels, handles)):
                ki = st.kernels[i]
                ki.name = k.name.encode()
                ki.handle = h
                ki.n_params = len(k.param_sizes)
                ki.param_bytes = k.param_bytes
                for j, (off, size) in enumerate(zip(k.param_offsets, k.param_sizes)):
                    ki.param_offset[j] = off
                    ki.param_size[j] = size
                self._handle_names[h] = k.name
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
            rc = self._load_fn(ctypes.byref(st), self._init, self._loadsym)
            if rc:
                raise PlanError(f"plan module load failed (cuda error {rc}): {st.error_msg.decode()}")
            sets = tuple(
                (
                    self._handle_names.get(st.setattrs[i].kernel, hex(st.setattrs[i].kernel)),
                    st.setattrs[i].attr,
                    st.setattrs[i].value,
                )
                for i in range(st.n_setattrs)
            )
            self.module_load = ModuleLoad(st.n_library_loads, st.n_kernel_lookups, sets)
            self._template = st
            return self.module_load

    # -- calls ---------------------------------------------------------------------------

    def _thread_state(self) -> tuple[_State, ctypes.Array, ctypes.Array]:
        loc = self._local
        st = getattr(loc, "state", None)
        if st is None:
            if self._template is None:
                raise PlanError("call Plan.load() before calling the plan")
            st = _State()
            # copy the inputs (kernel tables, attribute answers) set up by load()
            ctypes.memmove(ctypes.addressof(st), ctypes.addressof(self._template), ctypes.sizeof(_State))
            buf = ctypes.create_string_buffer(max(self._struct.size, 8) + 8)
            ret_off = self._struct.size + (-self._struct.size % 8)
            n = len(self.signature)
            argv = (ctypes.c_void_p * (n + 1))()
            base = ctypes.addressof(buf)
            for i, off in enumerate(self._offsets):
                argv[i] = base + off
            argv[n] = base + ret_off
            loc.state, loc.buf, loc.argv = st, buf, argv
        return st, loc.buf, loc.argv

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
        each tensor's rank and static modes. Generated once per plan: the per-call fast path."""
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

    def call(self, flat: Sequence[Any], pattern: int = -1) -> _State:
        """Run the entry with already-flattened arguments; returns this thread's shim state
        (valid until this thread's next call). ``pattern`` >= 0 poisons the stack first."""
        st, buf, argv = self._thread_state()
        try:
            self._struct.pack_into(buf, 0, *flat)
        except struct.error as e:
            raise ArgumentError(f"argument out of range for the plan's C types: {e}") from None
        rc = self._call_fn(ctypes.byref(st), self._entry, argv, len(argv), pattern)
        if rc:
            raise PlanError(f"plan call failed (cuda error {rc}): {st.error_msg.decode() or 'host code error'}")
        return st

    def call_launch(self, flat: Sequence[Any], launch_fn: int) -> int:
        """Run the entry with flattened arguments, then launch the recorded launch(es) through
        ``launch_fn`` (the address of the driver's ``cuLaunchKernelEx``); one foreign call.
        Returns the number of launches; raises PlanError (nothing launched) or LaunchError."""
        st, buf, argv = self._thread_state()
        try:
            self._struct.pack_into(buf, 0, *flat)
        except struct.error as e:
            raise ArgumentError(f"argument out of range for the plan's C types: {e}") from None
        rc = self._call_launch_fn(ctypes.byref(st), self._entry, argv, len(argv), launch_fn)
        if rc:
            if st.launch_error:
                raise LaunchError(f"cuLaunchKernelEx failed with CUresult {st.launch_error}", st.launch_error)
            raise PlanError(f"plan call failed (cuda error {rc}): {st.error_msg.decode() or 'host code error'}")
        return st.n_launches

    def plan(self, args: Sequence[Any], pattern: int = -1) -> list[Launch]:
        """Validate ``args``, run FA4's host code, and return the launch(es) it would make."""
        st = self.call(self.flatten(args), pattern)
        return [self._launch(st.launches[i]) for i in range(st.n_launches)]

    def _launch(self, rec: _Launch) -> Launch:
        return Launch(
            kernel=self._handle_names.get(rec.kernel, hex(rec.kernel)),
            grid=tuple(rec.grid),  # type: ignore[arg-type]
            block=tuple(rec.block),  # type: ignore[arg-type]
            smem=rec.smem,
            attributes={rec.attr_id[i]: bytes(rec.attr_val[i]) for i in range(rec.n_attrs)},
            param_bytes=bytes(rec.params[: rec.param_bytes]),
        )


def _make_packer(signature: Sequence[Arg]) -> Callable[[Mapping[str, Any]], list[Any]]:
    """Generate ``pack(named) -> list`` for a signature: straight-line code, one line per field."""
    lines = ["def pack(a):", "    out = []"]
    for spec in signature:
        n = spec.name
        if isinstance(spec, TensorArg):
            lines += [f"    t = a[{n!r}]", "    s = t.shape", "    st = t.strides"]
            lines.append(
                f"    if len(s) != {spec.rank} or len(st) != {spec.rank}: "
                f"raise ArgumentError(f'{n}: expected rank {spec.rank}, got shape {{tuple(s)}}')"
            )
            for i, v in enumerate(spec.shape):
                if v is not None:
                    lines.append(
                        f"    if s[{i}] != {v}: raise ArgumentError(f'{n}: mode {i} is compiled as {v}, got {{s[{i}]}}')"
                    )
            for i, v in enumerate(spec.stride):
                if v is not None:
                    lines.append(
                        f"    if st[{i}] != {v} and s[{i}] != 1: "
                        f"raise ArgumentError(f'{n}: stride {i} must be {v}, got {{st[{i}]}}')"
                    )
            fields = ["t.ptr"] + [f"s[{i}]" for i, v in enumerate(spec.shape) if v is None]
            fields += [f"st[{i}]" for i, v in enumerate(spec.stride) if v is None]
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
    exec("\n".join(lines), scope)  # noqa: S102 - generated from the recorded signature only
    return scope["pack"]


def target_answers(smem_optin: int, static_smem: int = 0) -> tuple[dict[int, int], dict[int, int]]:
    """Attribute answers for a plan's module load on a machine without the GPU."""
    return {DEV_ATTR_MAX_SMEM_OPTIN: smem_optin}, {FUNC_ATTR_SHARED_SIZE_BYTES: static_smem}


def open_plan(library_bytes: bytes, meta: Mapping[str, Any]) -> Plan:
    """Load a plan from verified bytes (its sha256 already checked by the caller).

    The bytes go into an anonymous memory file that is then loaded, so what runs is exactly what
    was hashed, even if the file in the cache changes afterwards, and nothing is written to disk
    (read-only caches work).
    """
    sig = meta["signature"]
    kernels = [KernelTable.from_meta(k) for k in meta["kernels"]]
    fd = os.memfd_create("fa4aot-plan", os.MFD_CLOEXEC)
    view = memoryview(library_bytes)
    while view:
        view = view[os.write(fd, view) :]
    # The fd stays open for the life of the process: dlopen matches libraries by path, and a
    # closed fd's /proc/self/fd/N name would be reused by the next plan.
    plan = Plan(f"/proc/self/fd/{fd}", sig["args"], kernels, sig["entry"], sig["init"], sig["load"])
    plan.fd = fd
    return plan
