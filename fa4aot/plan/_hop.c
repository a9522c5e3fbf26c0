/* fa4aot.plan._hop: the Python -> C hop of a bound plan call, without ctypes.
 *
 * A bound call's launch writes its per-call words (tensor addresses, 32-bit values) and the
 * stream into the call block, then calls the shim's fa4aot_shim_run_bound(block). Through ctypes
 * that is a struct.pack_into and a foreign call (0.33 us on the 2-core CI box); here it is one
 * METH_FASTCALL call (0.14 us; benchmarks/hop.py). The GIL is released around the shim call, as
 * ctypes does, so a launch that blocks in the driver does not stall other threads.
 *
 * Optional: the runtime falls back to ctypes where this module was not built (fa4aot/plan/
 * library.py). Limited API (abi3), so one build serves every CPython >= 3.10 of its host arch.
 */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* fa4aot_shim_run and fa4aot_shim_run_bound (fa4aot/plan/shim.c) */
typedef int32_t (*run_bound_fn)(void *block);

/* The call block's layout (fa4aot.plan.abi.CallBlock), set once by layout(). */
static Py_ssize_t ptrs_offset = -1;
static Py_ssize_t stream_offset = -1;
static Py_ssize_t max_words = 0;
static PyObject *argument_error = NULL;

/* torch's reader of a tensor object's data address - torch._C._dynamo.guards.
 * _torchinductor_pyobject_tensor_data_ptr, the function Inductor's generated C++ kernels call on
 * their tensor arguments - and the class (torch.Tensor) whose instances it is called on. Set by
 * tensor_reader(); it throws a C++ exception on a tensor without storage, which C cannot catch, so
 * only launch_tensors() and aligned() use it, and only code fa4aot generates (prepared calls, the
 * fast path's served calls) calls those, after torch's own check (TensorGuards) passed every
 * tensor: each exactly of the bound class and dispatch keys, so a dense tensor with storage. */
typedef void *(*tensor_ptr_fn)(PyObject *);
static tensor_ptr_fn tensor_ptr = NULL;
static PyObject *tensor_type = NULL;

static int as_u64(PyObject *obj, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(argument_error != NULL ? argument_error : PyExc_ValueError,
                     "a tensor address, per-call word or stream is not a 64-bit unsigned int: %R", obj);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* A word of launch_tensors(): a tensor of exactly tensor_type (its address), else an int. */
static int word_of(PyObject *obj, uint64_t *out) {
    if ((PyObject *)Py_TYPE(obj) == tensor_type) {
        *out = (uint64_t)(uintptr_t)tensor_ptr(obj);
        return 0;
    }
    return as_u64(obj, out);
}

/* layout(ptrs_offset, stream_offset, max_words, error_class) */
static PyObject *layout(PyObject *self, PyObject *args) {
    Py_ssize_t p, s, m;
    PyObject *err;
    if (!PyArg_ParseTuple(args, "nnnO", &p, &s, &m, &err))
        return NULL;
    if (p < 0 || s < 0 || m <= 0) {
        PyErr_SetString(PyExc_ValueError, "bad call block layout");
        return NULL;
    }
    Py_INCREF(err);
    Py_XDECREF(argument_error);
    argument_error = err;
    ptrs_offset = p;
    stream_offset = s;
    max_words = m;
    Py_RETURN_NONE;
}

/* tensor_reader(address, cls): torch's tensor address reader and the class it reads. */
static PyObject *tensor_reader(PyObject *self, PyObject *args) {
    PyObject *addr, *cls;
    if (!PyArg_ParseTuple(args, "OO", &addr, &cls))
        return NULL;
    void *fn = PyLong_AsVoidPtr(addr);
    if (fn == NULL && PyErr_Occurred())
        return NULL;
    if (fn == NULL || !PyType_Check(cls)) {
        PyErr_SetString(PyExc_ValueError, "tensor_reader() takes a function address and a class");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XDECREF(tensor_type);
    tensor_type = cls;
    tensor_ptr = (tensor_ptr_fn)fn;
    Py_RETURN_NONE;
}

/* The shim function and call block of a launch()/run() call (args[0], args[1]); -1 on error. */
static int fn_and_block(PyObject *const *args, run_bound_fn *fn, char **block) {
    *fn = (run_bound_fn)PyLong_AsVoidPtr(args[0]);
    if (*fn == NULL && PyErr_Occurred())
        return -1;
    *block = (char *)PyLong_AsVoidPtr(args[1]);
    if (*block == NULL && PyErr_Occurred())
        return -1;
    if (*fn == NULL || *block == NULL) {
        PyErr_SetString(PyExc_ValueError, "the hop needs the shim's function and a call block");
        return -1;
    }
    return 0;
}

/* fn(block) with the GIL released; the shim's return code. */
static PyObject *call_shim(run_bound_fn fn, char *block) {
    int32_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fn(block);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

/* launch() and launch_tensors(): write the words (read_tensors: tensors too) and the stream. */
static PyObject *launch_words(PyObject *const *args, Py_ssize_t nargs, int read_tensors) {
    if (ptrs_offset < 0) {
        PyErr_SetString(PyExc_RuntimeError, "fa4aot.plan._hop.layout() was not called");
        return NULL;
    }
    if (read_tensors && tensor_ptr == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "fa4aot.plan._hop.tensor_reader() was not called");
        return NULL;
    }
    Py_ssize_t n = nargs - 3;
    if (n < 0 || n > max_words) {
        PyErr_Format(PyExc_TypeError, "launch() takes the function, the block, 0..%zd words and the stream",
                     max_words);
        return NULL;
    }
    run_bound_fn fn;
    char *block;
    if (fn_and_block(args, &fn, &block) < 0)
        return NULL;
    uint64_t *words = (uint64_t *)(block + ptrs_offset);
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((read_tensors ? word_of(args[2 + i], &words[i]) : as_u64(args[2 + i], &words[i])) < 0)
            return NULL;
    }
    if (as_u64(args[nargs - 1], (uint64_t *)(block + stream_offset)) < 0)
        return NULL;
    return call_shim(fn, block);
}

/* launch(run_bound, block, *words, stream) -> the shim's return code */
static PyObject *launch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return launch_words(args, nargs, 0);
}

/* launch_tensors(run_bound, block, *words, stream): launch() whose words may be tensors of the
 * reader's class, whose addresses it reads (only after torch's check of them: see tensor_ptr). */
static PyObject *launch_tensors(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return launch_words(args, nargs, 1);
}

/* aligned(masks, *tensors) -> bool: whether every tensor's address & masks[i] is 0 (masks: bytes,
 * one alignment - 1 per tensor; tensors of the reader's class, checked as for launch_tensors). */
static PyObject *aligned(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (tensor_ptr == NULL || nargs < 1 || !PyBytes_Check(args[0]) || PyBytes_Size(args[0]) != nargs - 1) {
        PyErr_SetString(PyExc_TypeError, "aligned() takes a mask per tensor and the tensors, after tensor_reader()");
        return NULL;
    }
    const unsigned char *masks = (const unsigned char *)PyBytes_AsString(args[0]);
    for (Py_ssize_t i = 1; i < nargs; i++) {
        if ((PyObject *)Py_TYPE(args[i]) != tensor_type) {
            PyErr_SetString(PyExc_TypeError, "aligned() reads tensors of the reader's class only");
            return NULL;
        }
        if ((uintptr_t)tensor_ptr(args[i]) & masks[i - 1])
            Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* The driver's cuStreamIsCapturing(CUstream, CUstreamCaptureStatus *) -> CUresult. */
typedef int (*capture_status_fn)(void *stream, int *status);

/* stream_buffer(capture_status, buffers, stream, slots) -> address or None: the buffer that
 * buffers (a dict: stream -> (address, slots)) holds for stream, when it holds at least slots
 * and the driver's capture_status (the address of cuStreamIsCapturing) says the stream is not
 * being captured into a CUDA graph. None otherwise - no buffer, too small, capturing, or the
 * driver could not tell: the caller's own path decides (it grows the buffer, or takes a block
 * the graph keeps). One C call for what torch's current-device and capture checks, a dict
 * lookup and a comparison cost in Python; the check is of the launch stream itself. */
static PyObject *stream_buffer(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "stream_buffer() takes the capture query, a dict, the stream and the slots");
        return NULL;
    }
    capture_status_fn query = (capture_status_fn)PyLong_AsVoidPtr(args[0]);
    if (query == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "stream_buffer() needs the driver's cuStreamIsCapturing");
        return NULL;
    }
    uint64_t stream;
    if (as_u64(args[2], &stream) < 0)
        return NULL;
    PyObject *have = PyDict_GetItemWithError(args[1], args[2]); /* borrowed */
    if (have == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (!PyTuple_Check(have) || PyTuple_Size(have) != 2)
        Py_RETURN_NONE;
    int enough = PyObject_RichCompareBool(PyTuple_GetItem(have, 1), args[3], Py_GE);
    if (enough < 0)
        return NULL;
    int status = -1;
    if (!enough || query((void *)(uintptr_t)stream, &status) != 0 || status != 0)
        Py_RETURN_NONE; /* (CU_STREAM_CAPTURE_STATUS_NONE is 0) */
    PyObject *ptr = PyTuple_GetItem(have, 0);
    Py_INCREF(ptr);
    return ptr;
}

/* run(fn, block) -> fn(block): the full launcher's call (it packs the whole argument struct) */
static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "run() takes the function and the call block");
        return NULL;
    }
    run_bound_fn fn;
    char *block;
    if (fn_and_block(args, &fn, &block) < 0)
        return NULL;
    return call_shim(fn, block);
}

static PyMethodDef methods[] = {
    {"layout", layout, METH_VARARGS,
     "layout(ptrs_offset, stream_offset, max_words, error_class): the call block's layout."},
    {"launch", (PyCFunction)(void (*)(void))launch, METH_FASTCALL,
     "launch(run_bound, block, *words, stream) -> int: write the words and stream, call the shim."},
    {"launch_tensors", (PyCFunction)(void (*)(void))launch_tensors, METH_FASTCALL,
     "launch_tensors(run_bound, block, *words, stream) -> int: launch() reading tensors' addresses."},
    {"aligned", (PyCFunction)(void (*)(void))aligned, METH_FASTCALL,
     "aligned(masks, *tensors) -> bool: every tensor's address aligned to its mask + 1."},
    {"tensor_reader", tensor_reader, METH_VARARGS,
     "tensor_reader(address, cls): torch's tensor address reader and the class it is called on."},
    {"stream_buffer", (PyCFunction)(void (*)(void))stream_buffer, METH_FASTCALL,
     "stream_buffer(capture_status, buffers, stream, slots) -> int | None: the stream's buffer, if usable now."},
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL, "run(fn, block) -> int: call the shim."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hop", "The Python -> C hop of a bound plan call (fa4aot.plan.library).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__hop(void) { return PyModule_Create(&module); }
