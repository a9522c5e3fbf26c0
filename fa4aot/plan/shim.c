/*
 * fa4aot launch-plan shim.
 *
 * Linked (at build time) with the host object that the CuTe DSL's export_to_c writes for one
 * variant. That object calls eight CUDA-runtime-shaped functions; this file defines them as
 * recorders, so calling the exported entry runs FA4's own host code (TMA descriptors, divmods,
 * scheduler params, grid, cluster, smem) and hands back the launch instead of making it.
 * Nothing here touches libcuda.
 *
 * fa4aot_shim_call_launch (and the call-block entries at the end) then make the recorded launches
 * for real through the driver's cuLaunchKernelEx, whose address the caller supplies (fa4aot gets
 * it from cuGetProcAddress), so a call is plan + launch in one foreign call.
 *
 * The caller owns a fa4aot_shim_state (inputs: handles and attribute answers; outputs: the
 * recorded launches) and binds it to the current thread, so plans are reentrant per thread.
 * A fa4aot_call block bundles everything one call needs (state, entry, packed arguments, the
 * launch function), so the hot path is one foreign call taking one pointer: fa4aot_shim_run for
 * fully packed arguments, fa4aot_shim_run_bound for prepared calls, which patch only the tensor
 * addresses and the stream. The layout of every struct below is mirrored by
 * fa4aot/plan/library.py; bump FA4AOT_SHIM_ABI when it changes.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FA4AOT_SHIM_ABI 3
#define FA4AOT_MAX_KERNELS 4
#define FA4AOT_MAX_PARAMS 64
#define FA4AOT_MAX_PARAM_BYTES 4096
#define FA4AOT_MAX_LAUNCHES 4
#define FA4AOT_MAX_ATTRS 8
#define FA4AOT_MAX_ANSWERS 8
#define FA4AOT_MAX_SETATTRS 16
#define FA4AOT_MAX_PTRS 16

#define EXPORT __attribute__((visibility("default")))
#define HIDDEN __attribute__((visibility("hidden")))

/* cudaError_t values we return. */
enum {
    kSuccess = 0,
    kErrorInvalidValue = 1,
    kErrorInitialization = 3,
    kErrorNotFound = 500,
    kErrorNotSupported = 801,
};

/* cudaLaunchConfig_t and cudaLaunchAttribute, as laid out by the CUDA 12/13 runtime headers. */
typedef struct {
    uint32_t x, y, z;
} shim_dim3;

typedef struct {
    uint32_t id;
    uint32_t pad;
    uint8_t val[64];
} shim_launch_attribute;

typedef struct {
    shim_dim3 grid;
    shim_dim3 block;
    size_t dynamic_smem;
    void *stream;
    const shim_launch_attribute *attrs;
    uint32_t num_attrs;
} shim_launch_config;

typedef struct {
    char name[512];
    uint64_t handle;
    uint32_t n_params;
    uint32_t param_bytes; /* EIATTR_CBANK_PARAM_SIZE */
    uint32_t param_offset[FA4AOT_MAX_PARAMS];
    uint32_t param_size[FA4AOT_MAX_PARAMS];
} fa4aot_kernel_info;

typedef struct {
    int32_t attr;
    int32_t value;
} fa4aot_answer;

typedef struct {
    uint64_t kernel;
    int32_t attr;
    int32_t value;
    int32_t device; /* -1 for cudaFuncSetAttribute */
    int32_t pad;
} fa4aot_setattr;

typedef struct {
    uint64_t kernel;
    uint32_t grid[3];
    uint32_t block[3];
    uint64_t smem;
    uint64_t stream;
    uint32_t n_attrs;
    uint32_t param_bytes;
    uint32_t attr_id[FA4AOT_MAX_ATTRS];
    uint8_t attr_val[FA4AOT_MAX_ATTRS][64];
    uint8_t params[FA4AOT_MAX_PARAM_BYTES];
} fa4aot_launch;

typedef struct {
    uint32_t abi;
    int32_t device;
    uint64_t library_handle;
    uint32_t n_kernels;
    uint32_t n_device_answers;
    uint32_t n_kernel_answers;
    uint32_t pad0;
    fa4aot_kernel_info kernels[FA4AOT_MAX_KERNELS];
    fa4aot_answer device_answers[FA4AOT_MAX_ANSWERS];
    fa4aot_answer kernel_answers[FA4AOT_MAX_ANSWERS];
    /* outputs */
    uint32_t n_library_loads;
    uint32_t n_kernel_lookups;
    uint32_t n_launches;
    uint32_t n_setattrs;
    int32_t error;
    int32_t launch_error; /* CUresult of a failed cuLaunchKernelEx (fa4aot_shim_call_launch) */
    char error_msg[256];
    fa4aot_setattr setattrs[FA4AOT_MAX_SETATTRS];
    fa4aot_launch launches[FA4AOT_MAX_LAUNCHES];
} fa4aot_shim_state;

static __thread fa4aot_shim_state *tls_state;

static int32_t fail(fa4aot_shim_state *s, int32_t code, const char *what, int32_t detail) {
    if (s && s->error == 0) {
        s->error = code;
        /* tiny formatter: what + " " + detail, no stdio needed */
        size_t n = strlen(what);
        if (n > 200) n = 200;
        memcpy(s->error_msg, what, n);
        char buf[16];
        int i = 0;
        uint32_t v = detail < 0 ? (uint32_t)(-detail) : (uint32_t)detail;
        do { buf[i++] = (char)('0' + v % 10); v /= 10; } while (v && i < 15);
        s->error_msg[n++] = ' ';
        if (detail < 0) s->error_msg[n++] = '-';
        while (i) s->error_msg[n++] = buf[--i];
        s->error_msg[n] = 0;
    }
    return code;
}

static fa4aot_kernel_info *find_kernel(fa4aot_shim_state *s, uint64_t handle) {
    for (uint32_t i = 0; i < s->n_kernels && i < FA4AOT_MAX_KERNELS; i++)
        if (s->kernels[i].handle == handle) return &s->kernels[i];
    return NULL;
}

static int32_t lookup(const fa4aot_answer *table, uint32_t n, int32_t attr, int32_t *value) {
    for (uint32_t i = 0; i < n && i < FA4AOT_MAX_ANSWERS; i++)
        if (table[i].attr == attr) {
            *value = table[i].value;
            return 1;
        }
    return 0;
}

/* ---- the eight symbols the exported host object imports ------------------------------------ */

HIDDEN int32_t _cudaLibraryLoadData(void **library, const void *code, void *jit_opts, void **jit_vals,
                                    unsigned n_jit, void *lib_opts, void **lib_vals, unsigned n_lib) {
    (void)code; (void)jit_opts; (void)jit_vals; (void)n_jit; (void)lib_opts; (void)lib_vals; (void)n_lib;
    fa4aot_shim_state *s = tls_state;
    if (!s) return kErrorInitialization;
    s->n_library_loads++;
    *library = (void *)(uintptr_t)s->library_handle;
    return kSuccess;
}

HIDDEN int32_t _cudaLibraryGetKernel(void **kernel, void *library, const char *name) {
    fa4aot_shim_state *s = tls_state;
    if (!s) return kErrorInitialization;
    s->n_kernel_lookups++;
    if ((uint64_t)(uintptr_t)library != s->library_handle)
        return fail(s, kErrorInvalidValue, "kernel lookup in an unknown library", 0);
    for (uint32_t i = 0; i < s->n_kernels && i < FA4AOT_MAX_KERNELS; i++)
        if (strncmp(s->kernels[i].name, name, sizeof s->kernels[i].name) == 0) {
            *kernel = (void *)(uintptr_t)s->kernels[i].handle;
            return kSuccess;
        }
    return fail(s, kErrorNotFound, "kernel name not in the cubin's kernel table", (int32_t)strlen(name));
}

HIDDEN int32_t _cudaGetDevice(int32_t *device) {
    fa4aot_shim_state *s = tls_state;
    if (!s) return kErrorInitialization;
    *device = s->device;
    return kSuccess;
}

HIDDEN int32_t _cudaDeviceGetAttribute(int32_t *value, int32_t attr, int32_t device) {
    (void)device;
    fa4aot_shim_state *s = tls_state;
    if (!s) return kErrorInitialization;
    if (!lookup(s->device_answers, s->n_device_answers, attr, value))
        return fail(s, kErrorNotSupported, "unanswered device attribute", attr);
    return kSuccess;
}

HIDDEN int32_t _cuKernelGetAttribute(int32_t *value, int32_t attr, void *kernel, int32_t device) {
    (void)kernel; (void)device;
    fa4aot_shim_state *s = tls_state;
    if (!s) return kErrorInitialization;
    if (!lookup(s->kernel_answers, s->n_kernel_answers, attr, value))
        return fail(s, kErrorNotSupported, "unanswered kernel attribute", attr);
    return kSuccess;
}

static int32_t record_setattr(void *kernel, int32_t attr, int32_t value, int32_t device) {
    fa4aot_shim_state *s = tls_state;
    if (!s) return kErrorInitialization;
    if (s->n_setattrs >= FA4AOT_MAX_SETATTRS)
        return fail(s, kErrorInvalidValue, "too many attribute settings", (int32_t)s->n_setattrs);
    fa4aot_setattr *r = &s->setattrs[s->n_setattrs++];
    r->kernel = (uint64_t)(uintptr_t)kernel;
    r->attr = attr;
    r->value = value;
    r->device = device;
    return kSuccess;
}

HIDDEN int32_t _cudaKernelSetAttributeForDevice(void *kernel, int32_t attr, int32_t value, int32_t device) {
    return record_setattr(kernel, attr, value, device);
}

HIDDEN int32_t _cudaFuncSetAttribute(const void *func, int32_t attr, int32_t value) {
    return record_setattr((void *)func, attr, value, -1);
}

HIDDEN int32_t _cudaLaunchKernelEx(const shim_launch_config *config, const void *func, void **args) {
    fa4aot_shim_state *s = tls_state;
    if (!s) return kErrorInitialization;
    fa4aot_kernel_info *k = find_kernel(s, (uint64_t)(uintptr_t)func);
    if (!k) return fail(s, kErrorInvalidValue, "launch of a kernel handle the plan did not hand out", 0);
    if (s->n_launches >= FA4AOT_MAX_LAUNCHES)
        return fail(s, kErrorInvalidValue, "too many launches in one call", (int32_t)s->n_launches);
    if (config->num_attrs > FA4AOT_MAX_ATTRS)
        return fail(s, kErrorInvalidValue, "too many launch attributes", (int32_t)config->num_attrs);
    if (k->param_bytes > FA4AOT_MAX_PARAM_BYTES)
        return fail(s, kErrorInvalidValue, "parameter buffer too large", (int32_t)k->param_bytes);
    fa4aot_launch *l = &s->launches[s->n_launches++];
    l->kernel = k->handle;
    l->grid[0] = config->grid.x; l->grid[1] = config->grid.y; l->grid[2] = config->grid.z;
    l->block[0] = config->block.x; l->block[1] = config->block.y; l->block[2] = config->block.z;
    l->smem = config->dynamic_smem;
    l->stream = (uint64_t)(uintptr_t)config->stream;
    l->n_attrs = config->num_attrs;
    for (uint32_t i = 0; i < config->num_attrs; i++) {
        l->attr_id[i] = config->attrs[i].id;
        memcpy(l->attr_val[i], config->attrs[i].val, 64);
    }
    l->param_bytes = k->param_bytes;
    memset(l->params, 0, k->param_bytes);
    for (uint32_t i = 0; i < k->n_params && i < FA4AOT_MAX_PARAMS; i++) {
        if (k->param_offset[i] + k->param_size[i] > k->param_bytes)
            return fail(s, kErrorInvalidValue, "parameter outside the parameter buffer", (int32_t)i);
        memcpy(l->params + k->param_offset[i], args[i], k->param_size[i]);
    }
    return kSuccess;
}

/* ---- what fa4aot calls ------------------------------------------------------------------- */

EXPORT uint32_t fa4aot_shim_abi(void) { return FA4AOT_SHIM_ABI; }

EXPORT size_t fa4aot_shim_state_size(void) { return sizeof(fa4aot_shim_state); }

EXPORT size_t fa4aot_shim_launches_offset(void) { return offsetof(fa4aot_shim_state, launches); }


typedef void (*entry_fn)(void **args, int32_t num_args);

/* Fill a stack region with `pattern`; the entry called next from the same frame depth reuses it,
 * which is how tests find the parameter bytes the host code never writes. */
static __attribute__((noinline)) void poison_stack(int pattern) {
    volatile unsigned char buf[32768];
    memset((void *)buf, pattern, sizeof buf);
    __asm__ volatile("" : : "r"(buf) : "memory");
}

/* CUlaunchConfig / CUlaunchAttribute of the CUDA driver API (cuda.h). */
typedef struct {
    uint32_t grid[3];
    uint32_t block[3];
    uint32_t smem;
    void *stream;
    const shim_launch_attribute *attrs;
    uint32_t num_attrs;
} shim_cu_launch_config;

typedef int32_t (*cu_launch_kernel_ex_fn)(const shim_cu_launch_config *config, void *f, void **params, void **extra);

/* Make the launches the last call recorded, in order, with cuLaunchKernelEx. */
static int32_t launch_recorded(fa4aot_shim_state *s, cu_launch_kernel_ex_fn launch) {
    for (uint32_t i = 0; i < s->n_launches; i++) {
        fa4aot_launch *l = &s->launches[i];
        fa4aot_kernel_info *k = find_kernel(s, l->kernel);
        if (!k) return fail(s, kErrorInvalidValue, "recorded launch of an unknown kernel", (int32_t)i);
        if (l->smem > 0xFFFFFFFFu) return fail(s, kErrorInvalidValue, "dynamic smem too large", (int32_t)i);
        void *params[FA4AOT_MAX_PARAMS];
        for (uint32_t j = 0; j < k->n_params && j < FA4AOT_MAX_PARAMS; j++) params[j] = l->params + k->param_offset[j];
        shim_launch_attribute attrs[FA4AOT_MAX_ATTRS];
        for (uint32_t a = 0; a < l->n_attrs && a < FA4AOT_MAX_ATTRS; a++) {
            attrs[a].id = l->attr_id[a];
            attrs[a].pad = 0;
            memcpy(attrs[a].val, l->attr_val[a], 64);
        }
        shim_cu_launch_config cfg = {
            {l->grid[0], l->grid[1], l->grid[2]},
            {l->block[0], l->block[1], l->block[2]},
            (uint32_t)l->smem,
            (void *)(uintptr_t)l->stream,
            attrs,
            l->n_attrs,
        };
        int32_t rc = launch(&cfg, (void *)(uintptr_t)k->handle, params, NULL);
        if (rc) {
            s->launch_error = rc;
            return rc;
        }
    }
    return kSuccess;
}

/* Run module load (init + load_to_device) against `state`; returns the first CUDA error. */
EXPORT int32_t fa4aot_shim_load(fa4aot_shim_state *state, entry_fn init, entry_fn load) {
    fa4aot_shim_state *prev = tls_state;
    tls_state = state;
    void *module = 0;
    void *library_ptr = &module;
    int32_t ret = 0;
    int32_t device = state->device;
    void *init_args[2] = {&library_ptr, &ret};
    init((void **)init_args, 2);
    if (ret == 0) {
        void *load_args[3] = {&library_ptr, &device, &ret};
        load((void **)load_args, 3);
    }
    tls_state = prev;
    return ret ? ret : state->error;
}

/* Call the exported entry with `args` (pointers to each argument, plus the int32 return slot as
 * the last one) against `state`. pattern >= 0 poisons the stack first (tests only). */
EXPORT int32_t fa4aot_shim_call(fa4aot_shim_state *state, entry_fn entry, void **args, int32_t num_args,
                                int32_t pattern) {
    fa4aot_shim_state *prev = tls_state;
    tls_state = state;
    state->n_launches = 0;
    state->n_setattrs = 0;
    state->error = 0;
    state->launch_error = 0;
    state->error_msg[0] = 0;
    if (pattern >= 0) poison_stack(pattern);
    entry(args, num_args);
    tls_state = prev;
    int32_t ret = *(int32_t *)args[num_args - 1];
    return state->error ? state->error : ret;
}

/* Call the entry, then launch what it recorded (see launch_recorded). A plan error leaves
 * launch_error 0; a driver error sets it. Nothing is launched if the plan fails. */
EXPORT int32_t fa4aot_shim_call_launch(fa4aot_shim_state *state, entry_fn entry, void **args, int32_t num_args,
                                       cu_launch_kernel_ex_fn launch) {
    int32_t rc = fa4aot_shim_call(state, entry, args, num_args, -1);
    if (rc) return rc;
    return launch_recorded(state, launch);
}

/* ---- call blocks: one foreign call per launch ------------------------------------------------ */

typedef struct {
    fa4aot_shim_state *state;
    entry_fn entry;
    void **argv;        /* pointers into argbuf, one per argument, then the int32 return slot */
    uint8_t *argbuf;    /* the packed arguments */
    cu_launch_kernel_ex_fn launch;
    int32_t nargs;      /* entries in argv, return slot included */
    /* prepared calls: where the tensor addresses and the stream go in argbuf */
    uint32_t n_ptrs;
    uint32_t ptr_offset[FA4AOT_MAX_PTRS];
    uint32_t stream_offset;
    uint32_t have_last; /* the recorded launches are valid for last_ptrs */
    uint64_t ptrs[FA4AOT_MAX_PTRS]; /* written by the caller before fa4aot_shim_run_bound */
    uint64_t stream;                /* likewise */
    uint64_t last_ptrs[FA4AOT_MAX_PTRS];
} fa4aot_call;

EXPORT size_t fa4aot_shim_call_size(void) { return sizeof(fa4aot_call); }

/* Run the entry on the packed arguments, then launch what it recorded. */
EXPORT int32_t fa4aot_shim_run(fa4aot_call *c) {
    c->have_last = 0;
    return fa4aot_shim_call_launch(c->state, c->entry, c->argv, c->nargs, c->launch);
}

/* A prepared call: write the new tensor addresses and stream into the packed arguments. When the
 * addresses are the ones of the last successful run, FA4's host code would compute the same
 * launch again (it is a pure function of its arguments; the stream only goes into the launch
 * configuration), so the recorded launch is reused with the new stream. */
EXPORT int32_t fa4aot_shim_run_bound(fa4aot_call *c) {
    if (c->n_ptrs > FA4AOT_MAX_PTRS) return kErrorInvalidValue;
    int same = c->have_last;
    for (uint32_t i = 0; i < c->n_ptrs; i++) {
        if (c->ptrs[i] != c->last_ptrs[i]) same = 0;
        memcpy(c->argbuf + c->ptr_offset[i], &c->ptrs[i], sizeof(uint64_t));
    }
    memcpy(c->argbuf + c->stream_offset, &c->stream, sizeof(uint64_t));
    fa4aot_shim_state *s = c->state;
    if (same) {
        for (uint32_t i = 0; i < s->n_launches; i++) s->launches[i].stream = c->stream;
        s->launch_error = 0;
        return launch_recorded(s, c->launch);
    }
    c->have_last = 0;
    int32_t rc = fa4aot_shim_call(s, c->entry, c->argv, c->nargs, -1);
    if (rc) return rc;
    memcpy(c->last_ptrs, c->ptrs, sizeof(uint64_t) * c->n_ptrs);
    c->have_last = 1;
    return launch_recorded(s, c->launch);
}
