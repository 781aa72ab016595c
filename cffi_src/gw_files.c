/* gpuwire remote file reads: see gw_files.h. */
#include "gw_files.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MAX_IO 0x7FFFF000ull   /* what Linux moves in one pread */

typedef int (*cu_htod_t)(uint64_t dst, const void *src, size_t n, void *stream);
typedef int (*cu_sync_t)(void *stream);

static pthread_once_t cuda_once = PTHREAD_ONCE_INIT;
static cu_htod_t cu_htod;
static cu_sync_t cu_sync;
static char cuda_why[200] = "not loaded";

static void cuda_init(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(cuda_why, sizeof cuda_why, "dlopen(libcuda.so.1): %s", e ? e : "failed");
        return;
    }
    cu_htod = (cu_htod_t)dlsym(h, "cuMemcpyHtoDAsync_v2");
    cu_sync = (cu_sync_t)dlsym(h, "cuStreamSynchronize");
    if (!cu_htod || !cu_sync) {
        cu_htod = NULL;
        cu_sync = NULL;
        snprintf(cuda_why, sizeof cuda_why, "libcuda.so.1 lacks cuMemcpyHtoDAsync_v2/cuStreamSynchronize");
        return;
    }
    cuda_why[0] = 0;
}

int gw_fr_cuda_load(void) {
    pthread_once(&cuda_once, cuda_init);
    return cu_htod ? 0 : -1;
}

const char *gw_fr_cuda_error(void) { return cuda_why; }

static int fail(gw_fr_status_t *st, size_t i, int kind, int err, uint64_t got, const char *what) {
    st->index = (int64_t)i;
    st->kind = kind;
    st->err = err;
    st->got = got;
    snprintf(st->what, sizeof st->what, "%s", what ? what : "");
    return kind;
}

/* the whole piece into buf, or the kind of failure (st filled) */
static int pread_full(const gw_fr_piece_t *q, size_t i, char *buf, gw_fr_status_t *st) {
    uint64_t done = 0;
    while (done < q->nbytes) {
        uint64_t m = q->nbytes - done;
        if (m > MAX_IO) m = MAX_IO;
        ssize_t r = pread(q->fd, buf + done, (size_t)m, (off_t)(q->offset + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            return fail(st, i, GW_FR_OS, errno, done, "pread");
        }
        if (r == 0) return fail(st, i, GW_FR_EOF, 0, done, "pread");
        done += (uint64_t)r;
    }
    return GW_FR_OK;
}

static void clear(gw_fr_status_t *st) {
    st->index = -1;
    st->kind = GW_FR_OK;
    st->err = 0;
    st->got = 0;
    st->what[0] = 0;
}

int gw_fr_read_host(const gw_fr_piece_t *p, size_t n, const volatile int *cancel, gw_fr_status_t *st) {
    clear(st);
    for (size_t i = 0; i < n; i++) {
        if (cancel && *cancel) return fail(st, i, GW_FR_CANCELLED, 0, 0, "");
        int k = pread_full(&p[i], i, (char *)(uintptr_t)p[i].dst, st);
        if (k) return k;
    }
    return GW_FR_OK;
}

int gw_fr_read_gpu(const gw_fr_piece_t *p, size_t n, uint64_t staging, uint64_t cap, uint64_t stream,
                   const volatile int *cancel, gw_fr_status_t *st) {
    clear(st);
    if (gw_fr_cuda_load() != 0) return fail(st, 0, GW_FR_BADARG, 0, 0, "libcuda");
    void *s = (void *)(uintptr_t)stream;
    char *base = (char *)(uintptr_t)staging;
    uint64_t fill = 0, run_dst = 0, run_src = 0, run_n = 0;
    int kind = GW_FR_OK, r;
    size_t i;
    for (i = 0; i < n; i++) {
        const gw_fr_piece_t *q = &p[i];
        if (q->nbytes > cap) {
            kind = fail(st, i, GW_FR_BADARG, 0, 0, "piece larger than staging");
            break;
        }
        if (fill + q->nbytes > cap) {
            if (run_n) {
                if ((r = cu_htod(run_dst, base + run_src, run_n, s)) != 0) {
                    kind = fail(st, i, GW_FR_CUDA, r, 0, "cuMemcpyHtoDAsync");
                    break;
                }
                run_n = 0;
            }
            if ((r = cu_sync(s)) != 0) {
                kind = fail(st, i, GW_FR_CUDA, r, 0, "cuStreamSynchronize");
                break;
            }
            fill = 0;
        }
        if (cancel && *cancel) { kind = fail(st, i, GW_FR_CANCELLED, 0, 0, ""); break; }
        if ((kind = pread_full(q, i, base + fill, st)) != GW_FR_OK) break;
        if (run_n && q->dst == run_dst + run_n && fill == run_src + run_n) {
            run_n += q->nbytes;
        } else {
            if (run_n && (r = cu_htod(run_dst, base + run_src, run_n, s)) != 0) {
                kind = fail(st, i, GW_FR_CUDA, r, 0, "cuMemcpyHtoDAsync");
                run_n = 0;
                break;
            }
            run_dst = q->dst;
            run_src = fill;
            run_n = q->nbytes;
        }
        fill += q->nbytes;
    }
    if (kind == GW_FR_OK && run_n && (r = cu_htod(run_dst, base + run_src, run_n, s)) != 0)
        kind = fail(st, n ? n - 1 : 0, GW_FR_CUDA, r, 0, "cuMemcpyHtoDAsync");
    /* copies queued still read staging: wait for them, also after a failure */
    r = cu_sync(s);
    if (kind == GW_FR_OK && r != 0) kind = fail(st, n ? n - 1 : 0, GW_FR_CUDA, r, 0, "cuStreamSynchronize");
    return kind;
}

int gw_fr_open(const char *path, char *link, size_t cap, int64_t *linklen, uint64_t *size) {
    int fd;
    do fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) return -errno;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    *size = (uint64_t)sb.st_size;
    *linklen = -1;
    if (cap > 1) {
        char proc[40];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        ssize_t r = readlink(proc, link, cap - 1);
        if (r >= 0 && (size_t)r < cap - 1) {
            link[r] = 0;
            *linklen = r;
        } else if (r >= 0) {          /* truncated: never accepted as a path */
            close(fd);
            return -ENAMETOOLONG;
        }
    }
    return fd;
}
