/* gpuwire remote file reads, the per-piece loop in C (gpuwire._files; see docs/gds.md).
 *
 * The server's read workers (gpuwire/gds/service.py) hand a task -- a batch of pieces
 * already checked in Python (descriptor open under a data root, range inside the file)
 * -- to one call here; cffi releases the GIL for it, so the 8 workers read in parallel
 * without Python in between. Host mode (CPU executor): pread straight into the
 * destination (host memory). GPU mode: pread into the worker's pinned buffer and
 * cuMemcpyHtoDAsync (pieces landing back to back in one copy) on the worker's stream,
 * synchronizing the stream before the buffer is reused and at the end. The CUDA entry
 * points come from dlopen("libcuda.so.1"): no link-time CUDA dependency. */
#ifndef GW_FILES_H
#define GW_FILES_H

#include <stddef.h>
#include <stdint.h>

/* one piece: nbytes at file offset `offset` of descriptor fd, to dst */
typedef struct {
    uint64_t dst;
    uint64_t offset;
    uint64_t nbytes;
    int32_t fd;
    uint32_t tag;        /* the caller's index (it names the file in errors) */
} gw_fr_piece_t;

#define GW_FR_OK 0
#define GW_FR_OS 1        /* pread failed: err is errno */
#define GW_FR_EOF 2       /* end of file before nbytes: got says how many came */
#define GW_FR_CUDA 3      /* a CUDA call failed: err is the CUresult, what its name */
#define GW_FR_CANCELLED 4 /* *cancel was set: the rest was not read */
#define GW_FR_BADARG 5    /* piece larger than the staging buffer, or no CUDA */

typedef struct {
    int64_t index;       /* the failed piece, -1 when none */
    int32_t kind;        /* GW_FR_* */
    int32_t err;
    uint64_t got;
    char what[40];
} gw_fr_status_t;

/* 0 when libcuda.so.1 loaded and every entry point resolved; -1 otherwise
 * (gw_fr_cuda_error() says why). Idempotent, thread-safe. */
int gw_fr_cuda_load(void);
const char *gw_fr_cuda_error(void);

/* open `path` read-only with O_NOFOLLOW | O_CLOEXEC in one call (GIL released): the
 * descriptor, what /proc/self/fd names as opened (into link, NUL-terminated; *linklen -1
 * where /proc is missing) and the size (fstat). Returns fd >= 0 or -errno; the caller
 * checks link against the data roots. */
int gw_fr_open(const char *path, char *link, size_t cap, int64_t *linklen, uint64_t *size);

/* host mode: pread each piece to its dst (a host address). Returns the kind (0 ok). */
int gw_fr_read_host(const gw_fr_piece_t *p, size_t n, const volatile int *cancel, gw_fr_status_t *st);

/* GPU mode (the calling thread's current context is used): pread into `staging`
 * (cap bytes, pinned) and copy with cuMemcpyHtoDAsync on `stream` (a CUstream);
 * the stream is synchronized before staging is refilled and before returning, also
 * after a failure (queued copies still read staging). Returns the kind (0 ok). */
int gw_fr_read_gpu(const gw_fr_piece_t *p, size_t n, uint64_t staging, uint64_t cap, uint64_t stream,
                   const volatile int *cancel, gw_fr_status_t *st);

#endif
