/*
 * fa4aot plan runner: loads one launch plan, runs its module load, then calls its entry on
 * argument buffers read from stdin and writes the shim state after each call to stdout.
 *
 * It exists to run a plan built for another host arch under user-mode emulation (an aarch64 plan
 * on an x86_64 build host through qemu-aarch64): the same runner, built natively, runs the
 * host's own plan on the same bytes, so the two recordings can be compared byte for byte.
 *
 * stdin:  u32 state_size, u32 n_args, u32 buf_size, state template (state_size bytes),
 *         u32 offsets[n_args], u32 n_calls, then n_calls argument buffers of buf_size bytes
 *         (the int32 return slot follows each buffer).
 * stdout: i32 load rc, state after load; then per call, twice (the stack below the call filled
 *         with 0x00, then with 0xff first, so bytes the host code never writes - padding in
 *         parameters and launch attributes - show up as the bytes that differ): i32 rc, state.
 * argv:   plan.so entry_symbol init_symbol load_symbol
 * All integers are little-endian (both hosts are); the state layout is the shim's (plan/shim.c),
 * identical on x86_64 and aarch64 (LP64, natural alignment).
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*entry_fn)(void **args, int32_t num_args);
typedef int32_t (*load_fn)(void *state, entry_fn init, entry_fn load);
typedef int32_t (*call_fn)(void *state, entry_fn entry, void **args, int32_t num_args, int32_t pattern);
typedef size_t (*size_fn)(void);

static void die(const char *what, const char *detail) {
    fprintf(stderr, "fa4aot-plan-runner: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(2);
}

static void read_all(void *p, size_t n) {
    if (n && fread(p, 1, n, stdin) != n) die("short input", NULL);
}

static void write_all(const void *p, size_t n) {
    if (n && fwrite(p, 1, n, stdout) != n) die("cannot write output", NULL);
}

static void *sym(void *lib, const char *name) {
    void *p = dlsym(lib, name);
    if (!p) die("missing symbol", name);
    return p;
}

int main(int argc, char **argv) {
    if (argc != 5) die("usage: fa4aot-plan-runner PLAN.so ENTRY INIT LOAD", NULL);
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) die("cannot load the plan", dlerror());
    size_fn state_size = (size_fn)sym(lib, "fa4aot_shim_state_size");
    load_fn load = (load_fn)sym(lib, "fa4aot_shim_load");
    call_fn call = (call_fn)sym(lib, "fa4aot_shim_call");
    entry_fn entry = (entry_fn)sym(lib, argv[2]);
    entry_fn init = (entry_fn)sym(lib, argv[3]);
    entry_fn loadsym = (entry_fn)sym(lib, argv[4]);

    uint32_t hdr[3];
    read_all(hdr, sizeof hdr);
    size_t ss = state_size();
    if (hdr[0] != ss) die("the state template does not match this plan's shim ABI", NULL);
    uint32_t n_args = hdr[1], buf_size = hdr[2];
    uint8_t *tmpl = calloc(1, ss), *state = calloc(1, ss);
    uint32_t *offsets = calloc(n_args ? n_args : 1, sizeof(uint32_t));
    /* the argument structs hold 8-byte fields: keep the buffer 16-byte aligned, return slot after */
    uint8_t *buf = aligned_alloc(16, ((size_t)buf_size + 8 + 15) / 16 * 16);
    void **args = calloc(n_args + 1, sizeof(void *));
    if (!tmpl || !state || !offsets || !buf || !args) die("out of memory", NULL);
    read_all(tmpl, ss);
    read_all(offsets, sizeof(uint32_t) * n_args);
    for (uint32_t i = 0; i < n_args; i++)
        if (offsets[i] >= buf_size) die("argument offset outside the buffer", NULL);

    int32_t rc = load(tmpl, init, loadsym);
    write_all(&rc, sizeof rc);
    write_all(tmpl, ss);

    uint32_t n_calls;
    read_all(&n_calls, sizeof n_calls);
    for (uint32_t c = 0; c < n_calls; c++) {
        memset(buf, 0, (size_t)buf_size + 8);
        read_all(buf, buf_size);
        for (uint32_t i = 0; i < n_args; i++) args[i] = buf + offsets[i];
        args[n_args] = buf + buf_size; /* the int32 return slot */
        for (int pattern = 0x00; pattern <= 0xff; pattern += 0xff) {
            memcpy(state, tmpl, ss);
            rc = call(state, entry, args, (int32_t)n_args + 1, pattern);
            write_all(&rc, sizeof rc);
            write_all(state, ss);
        }
    }
    fflush(stdout);
    return 0;
}
