/* A fake CUDA driver (libcuda.so.1) for the CPU test suite: tests/test_fake_driver.py.
 *
 * The runtime's load / launch / memory paths call NVIDIA's driver through cuda.bindings and cuda.core, which
 * nothing on a machine without a GPU exercises. This library answers those calls for one pretend device
 * (compute capability from FAKE_CUDA_CC, e.g. "8.0"; default 9.0), keeps the per-thread current context as
 * the real driver does, fails a launch with no current context (CUDA_ERROR_INVALID_CONTEXT, as the real
 * driver does on a thread that has none, e.g. torch's autograd worker), and appends one line per interesting
 * call to the file FAKE_CUDA_LOG:
 *
 *   kernel <lowered name> <handle>       cuLibraryGetKernel
 *   attr <handle> <attribute> <value>    cuKernelSetAttribute / cuFuncSetAttribute
 *   launch <handle> <gx> <gy> <gz> <bx> <by> <bz> <smem> <context current: 0/1>
 *   alloc <bytes> / free                 stream-ordered allocations
 *   tensormap <dtype> <rank> <address> <dim0> <dim1> <stride1> <box0> <box1> <estride0> <estride1>
 *             <interleave> <swizzle> <l2 promotion> <oob fill>      cuTensorMapEncodeTiled
 *
 * It runs no code: kernels are never executed, memory is a static arena. Build:
 *   cc -shared -fPIC -o libcuda.so.1 fake_libcuda.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *P;

enum { OK = 0, ERR_INVALID_VALUE = 1, ERR_INVALID_DEVICE = 101, ERR_INVALID_CONTEXT = 201,
       ERR_NOT_FOUND = 500, ERR_LAUNCH_FAILED = 719 };

static __thread P current_context = 0;
static char handles[8192];            /* addresses used as opaque handles */
static char arena[1 << 20];           /* "device memory" */
static size_t arena_used = 0;
static char kernel_names[64][256];
static int kernel_count = 0;

#define PRIMARY_CONTEXT ((P)(handles + 16))

static void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void log_line(const char *fmt, ...) {
  const char *path = getenv("FAKE_CUDA_LOG");
  if (!path) return;
  FILE *f = fopen(path, "a");
  if (!f) return;
  va_list ap;
  va_start(ap, fmt);
  vfprintf(f, fmt, ap);
  va_end(ap);
  fputc('\n', f);
  fclose(f);
}

static int cc_major(void) { const char *s = getenv("FAKE_CUDA_CC"); return s ? atoi(s) : 9; }
static int cc_minor(void) { const char *s = getenv("FAKE_CUDA_CC"); const char *d = s ? strchr(s, '.') : 0; return d ? atoi(d + 1) : 0; }

CUresult cuInit(unsigned flags) { return OK; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return OK; }
CUresult cuGetErrorString(CUresult e, const char **s) {
  *s = e == ERR_INVALID_CONTEXT ? "invalid device context" : e == ERR_LAUNCH_FAILED ? "unspecified launch failure" : "fake driver error";
  return OK;
}
CUresult cuGetErrorName(CUresult e, const char **s) {
  *s = e == ERR_INVALID_CONTEXT ? "CUDA_ERROR_INVALID_CONTEXT" : e == ERR_LAUNCH_FAILED ? "CUDA_ERROR_LAUNCH_FAILED" : "CUDA_ERROR_FAKE";
  return OK;
}

/* Devices */
CUresult cuDeviceGetCount(int *c) { *c = 1; return OK; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) { if (ordinal != 0) return ERR_INVALID_DEVICE; *d = 0; return OK; }
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
  switch (attr) {
    case 75: *v = cc_major(); break;          /* COMPUTE_CAPABILITY_MAJOR */
    case 76: *v = cc_minor(); break;          /* COMPUTE_CAPABILITY_MINOR */
    case 16: *v = 132; break;                 /* MULTIPROCESSOR_COUNT */
    case 97: *v = 232448; break;              /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    case 8: *v = 49152; break;                /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 1: *v = 1024; break;                 /* MAX_THREADS_PER_BLOCK */
    case 10: *v = 32; break;                  /* WARP_SIZE */
    default: *v = 1;
  }
  return OK;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice d) { snprintf(name, len, "Fake GPU (sm_%d%d)", cc_major(), cc_minor()); return OK; }
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) { *bytes = (size_t)80 << 30; return OK; }
CUresult cuDeviceGetUuid(char *u, CUdevice d) { memset(u, 7, 16); return OK; }
CUresult cuDeviceGetUuid_v2(char *u, CUdevice d) { memset(u, 7, 16); return OK; }
CUresult cuDeviceGetPCIBusId(char *s, int len, CUdevice d) { snprintf(s, len, "0000:00:00.0"); return OK; }

/* Contexts: one primary context, current per thread */
CUresult cuDevicePrimaryCtxRetain(P *c, CUdevice d) { *c = PRIMARY_CONTEXT; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { return OK; }
CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned *flags, int *active) { *flags = 0; *active = 1; return OK; }
CUresult cuCtxGetCurrent(P *c) { *c = current_context; return OK; }
CUresult cuCtxSetCurrent(P c) { current_context = c; return OK; }
CUresult cuCtxPushCurrent_v2(P c) { current_context = c; return OK; }
CUresult cuCtxPopCurrent_v2(P *c) { if (c) *c = current_context; current_context = 0; return OK; }
CUresult cuCtxGetDevice(CUdevice *d) { if (!current_context) return ERR_INVALID_CONTEXT; *d = 0; return OK; }
CUresult cuCtxSynchronize(void) { return current_context ? OK : ERR_INVALID_CONTEXT; }
CUresult cuCtxGetId(P c, unsigned long long *id) { *id = 1; return OK; }
CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) { if (least) *least = 0; if (greatest) *greatest = -5; return OK; }
CUresult cuCtxGetFlags(unsigned *flags) { *flags = 0; return OK; }

/* Streams and events */
CUresult cuStreamCreate(P *s, unsigned flags) { *s = handles + 256; return OK; }
CUresult cuStreamCreateWithPriority(P *s, unsigned flags, int prio) { *s = handles + 256; return OK; }
CUresult cuStreamDestroy_v2(P s) { return OK; }
CUresult cuStreamGetCtx(P s, P *c) { *c = PRIMARY_CONTEXT; return OK; }
CUresult cuStreamGetDevice(P s, CUdevice *d) { *d = 0; return OK; }
CUresult cuStreamGetFlags(P s, unsigned *flags) { *flags = 1; return OK; }
CUresult cuStreamGetPriority(P s, int *prio) { *prio = 0; return OK; }
CUresult cuStreamGetId(P s, unsigned long long *id) { *id = (uintptr_t)s; return OK; }
CUresult cuStreamSynchronize(P s) { return OK; }
CUresult cuStreamWaitEvent(P s, P e, unsigned flags) { return OK; }
CUresult cuStreamIsCapturing(P s, int *status) { *status = 0; return OK; }
CUresult cuEventCreate(P *e, unsigned flags) { *e = handles + 512; return OK; }
CUresult cuEventRecord(P e, P s) { return OK; }
CUresult cuEventDestroy_v2(P e) { return OK; }

/* Modules and kernels: each name gets its own handle so launches can be told apart */
CUresult cuLibraryLoadData(P *lib, const void *code, P a, P b, unsigned n, P c, P d, unsigned m) {
  const unsigned char *bytes = code;
  if (!(bytes[0] == 0x7f && bytes[1] == 'E' && bytes[2] == 'L' && bytes[3] == 'F')) return ERR_INVALID_VALUE;
  *lib = handles + 1024;
  return OK;
}
CUresult cuLibraryUnload(P lib) { return OK; }
CUresult cuLibraryGetKernel(P *k, P lib, const char *name) {
  int i;
  for (i = 0; i < kernel_count && strcmp(kernel_names[i], name); i++) {}
  if (i == kernel_count) {
    if (kernel_count == 64) return ERR_NOT_FOUND;
    snprintf(kernel_names[kernel_count++], 256, "%s", name);
  }
  *k = handles + 2048 + 8 * i;
  log_line("kernel %s %p", name, *k);
  return OK;
}
CUresult cuKernelGetFunction(P *f, P k) { *f = k; return OK; }
CUresult cuKernelGetLibrary(P *lib, P k) { *lib = handles + 1024; return OK; }
CUresult cuKernelGetName(const char **name, P k) { *name = kernel_names[((char *)k - handles - 2048) / 8]; return OK; }
CUresult cuKernelSetAttribute(int attr, int value, P k, CUdevice d) { log_line("attr %p %d %d", k, attr, value); return OK; }
CUresult cuKernelGetAttribute(int *v, int attr, P k, CUdevice d) { *v = 0; return OK; }
CUresult cuFuncSetAttribute(P f, int attr, int value) { log_line("attr %p %d %d", f, attr, value); return OK; }

typedef struct { unsigned gx, gy, gz, bx, by, bz, smem; P stream; P attrs; unsigned nattrs; } CUlaunchConfig;
CUresult cuLaunchKernelEx(const CUlaunchConfig *c, P f, void **params, void **extra) {
  log_line("launch %p %u %u %u %u %u %u %u %d", f, c->gx, c->gy, c->gz, c->bx, c->by, c->bz, c->smem,
           current_context != 0);
  if (!current_context) return ERR_INVALID_CONTEXT;
  return getenv("FAKE_CUDA_FAIL_LAUNCH") ? ERR_LAUNCH_FAILED : OK;
}

/* TMA tensor maps: the parameters are logged; the map holds the address then a fixed pattern. The real driver
 * validates more (alignment, box <= 256, swizzle span); rank 2 is all sparsert encodes. */
CUresult cuTensorMapEncodeTiled(void *map, int dtype, unsigned rank, void *addr, const uint64_t *dims,
                                const uint64_t *strides, const uint32_t *box, const uint32_t *estrides,
                                int interleave, int swizzle, int l2, int oob) {
  if (rank != 2) return ERR_INVALID_VALUE;
  log_line("tensormap %d %u %p %llu %llu %llu %u %u %u %u %d %d %d %d", dtype, rank, addr,
           (unsigned long long)dims[0], (unsigned long long)dims[1], (unsigned long long)strides[0], box[0],
           box[1], estrides[0], estrides[1], interleave, swizzle, l2, oob);
  memset(map, 0x5a, 128);
  memcpy(map, &addr, sizeof addr);
  return OK;
}

/* Stream-ordered memory */
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) { *free_bytes = sizeof arena - arena_used; *total = (size_t)80 << 30; return OK; }
CUresult cuDeviceGetDefaultMemPool(P *pool, CUdevice d) { *pool = handles + 3072; return OK; }
CUresult cuDeviceGetMemPool(P *pool, CUdevice d) { *pool = handles + 3072; return OK; }
CUresult cuMemPoolGetAttribute(P pool, int attr, void *v) { memset(v, 0, 8); return OK; }
CUresult cuMemPoolSetAttribute(P pool, int attr, void *v) { return OK; }
CUresult cuMemPoolSetAccess(P pool, P desc, size_t n) { return OK; }
CUresult cuMemPoolGetAccess(int *flags, P pool, P loc) { *flags = 3; return OK; }
CUresult cuMemPoolTrimTo(P pool, size_t n) { return OK; }
CUresult cuMemPoolCreate(P *pool, P props) { *pool = handles + 3100; return OK; }
CUresult cuMemPoolDestroy(P pool) { return OK; }
CUresult cuMemAllocFromPoolAsync(unsigned long long *ptr, size_t n, P pool, P s) {
  size_t size = (n + 255) & ~(size_t)255;
  if (arena_used + size > sizeof arena) return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
  *ptr = (uintptr_t)(arena + arena_used);
  arena_used += size;
  log_line("alloc %zu", n);
  return OK;
}
CUresult cuMemAllocAsync(unsigned long long *ptr, size_t n, P s) { return cuMemAllocFromPoolAsync(ptr, n, 0, s); }
CUresult cuMemFreeAsync(unsigned long long ptr, P s) { log_line("free"); return OK; }
CUresult cuPointerGetAttribute(void *data, int attr, unsigned long long p) { memset(data, 0, 8); if (attr == 2) *(int *)data = 2; return OK; }
CUresult cuPointerGetAttributes(unsigned n, int *attrs, void **data, unsigned long long p) { for (unsigned i = 0; i < n; i++) if (data[i]) memset(data[i], 0, 8); return OK; }

/* cuda.bindings resolves every entry point through cuGetProcAddress: answer with this library's symbols */
CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int version, unsigned long long flags, int *status) {
  const char *suffixes[] = {"", "_v2", 0};
  char name[256];
  void *p = 0;
  for (int i = 0; suffixes[i] && !p; i++) {
    snprintf(name, sizeof name, "%s%s", sym, suffixes[i]);
    p = dlsym(RTLD_DEFAULT, name);
  }
  if (p) {
    Dl_info info;
    if (!dladdr(p, &info) || !strstr(info.dli_fname, "libcuda")) p = 0;
  }
  *pfn = p;
  if (status) *status = p ? 0 : 1;
  return p ? OK : ERR_NOT_FOUND;
}
CUresult cuGetProcAddress(const char *sym, void **pfn, int version, unsigned long long flags) {
  return cuGetProcAddress_v2(sym, pfn, version, flags, 0);
}
