/* gpuwire remote file reads: see gw_files.h. */
#define _GNU_SOURCE   /* O_DIRECT */
#include "gw_files.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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
        int fd = (q->flags & GW_FR_DIRECT) && done % GW_FR_ALIGN == 0 ? q->fd : q->bfd;
        ssize_t r = pread(fd, buf + done, (size_t)m, (off_t)(q->offset + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EINVAL && fd != q->bfd) {   /* O_DIRECT refused here: buffered */
                r = pread(q->bfd, buf + done, (size_t)m, (off_t)(q->offset + done));
                if (r < 0 && errno == EINTR) continue;
            }
            if (r < 0) return fail(st, i, GW_FR_OS, errno, done, "pread");
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
        uint64_t at = fill;   /* O_DIRECT reads land at an aligned place of the (page-aligned) buffer */
        if (q->flags & GW_FR_DIRECT) at = (fill + GW_FR_ALIGN - 1) / GW_FR_ALIGN * GW_FR_ALIGN;
        if (at + q->nbytes > cap) {
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
            at = 0;
        }
        if (cancel && *cancel) { kind = fail(st, i, GW_FR_CANCELLED, 0, 0, ""); break; }
        if ((kind = pread_full(q, i, base + at, st)) != GW_FR_OK) break;
        if (run_n && q->dst == run_dst + run_n && at == run_src + run_n) {
            run_n += q->nbytes;
        } else {
            if (run_n && (r = cu_htod(run_dst, base + run_src, run_n, s)) != 0) {
                kind = fail(st, i, GW_FR_CUDA, r, 0, "cuMemcpyHtoDAsync");
                run_n = 0;
                break;
            }
            run_dst = q->dst;
            run_src = at;
            run_n = q->nbytes;
        }
        fill = at + q->nbytes;
    }
    if (kind == GW_FR_OK && run_n && (r = cu_htod(run_dst, base + run_src, run_n, s)) != 0)
        kind = fail(st, n ? n - 1 : 0, GW_FR_CUDA, r, 0, "cuMemcpyHtoDAsync");
    /* copies queued still read staging: wait for them, also after a failure */
    r = cu_sync(s);
    if (kind == GW_FR_OK && r != 0) kind = fail(st, n ? n - 1 : 0, GW_FR_CUDA, r, 0, "cuStreamSynchronize");
    return kind;
}

static int fr_checked(int fd, char *link, size_t cap, int64_t *linklen, uint64_t *size);

int gw_fr_open(const char *path, char *link, size_t cap, int64_t *linklen, uint64_t *size) {
    int fd;
    do fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);   /* a FIFO must not block */
    while (fd < 0 && errno == EINTR);
    if (fd < 0) return -errno;
    return fr_checked(fd, link, cap, linklen, size);
}

/* fd (just opened): a regular file, its size and what /proc/self/fd names; fd or -errno (closed) */
static int fr_checked(int fd, char *link, size_t cap, int64_t *linklen, uint64_t *size) {
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    if (!S_ISREG(sb.st_mode)) {        /* regular files only: the caller resolves again and names it */
        close(fd);
        return S_ISDIR(sb.st_mode) ? -EISDIR : -EINVAL;
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

/* ---------------------------------------------------------------- the file table (see gw_files.h) */
#include <stdlib.h>

typedef struct {
    char *key;           /* the client's path, as sent */
    uint32_t klen;
    uint64_t hash;
    char *real;          /* NULL: Python must resolve it (again) */
    int fd;              /* -1: closed */
    uint64_t size;
    int32_t refs;        /* plans holding it open */
    int32_t prev, next;  /* idle list (fd >= 0, refs == 0), oldest first */
    int32_t idle;
    int32_t direct;      /* see gw_ft_learn */
    int32_t fresh;       /* learned since its last open */
    int dfd;             /* O_DIRECT descriptor of the same file: -1 not opened, -2 unusable */
} ft_ent_t;

struct gw_ft {
    pthread_mutex_t mu;
    char **root;
    size_t *rootlen;
    uint32_t nroots;
    uint32_t max_open;
    ft_ent_t *ent;
    uint32_t nent, capent;
    int32_t *slot;       /* open addressing: entry index or -1 */
    uint32_t nslot;      /* power of two */
    int32_t idle_head, idle_tail;
    uint64_t nopen, opens, resolves, direct_entries, direct_bytes;
    uint32_t max_paths, nfree;
    int32_t free_head;      /* dropped entries' slots (key NULL), chained by next */
    int direct, host;
};

#define FT_MAX_ENTRIES (1u << 20)

static uint64_t ft_hash(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 1099511628211ull; }
    return h;
}

gw_ft_t *gw_ft_new(const char *roots, size_t len, uint32_t nroots, uint32_t max_open) {
    gw_ft_t *ft = calloc(1, sizeof *ft);
    if (!ft) return NULL;
    pthread_mutex_init(&ft->mu, NULL);
    ft->max_open = max_open ? max_open : 1;
    ft->idle_head = ft->idle_tail = -1;
    ft->free_head = -1;
    ft->max_paths = FT_MAX_ENTRIES;
    ft->root = calloc(nroots ? nroots : 1, sizeof *ft->root);
    ft->rootlen = calloc(nroots ? nroots : 1, sizeof *ft->rootlen);
    ft->nslot = 1024;
    ft->slot = malloc(ft->nslot * sizeof *ft->slot);
    if (!ft->root || !ft->rootlen || !ft->slot) { gw_ft_free(ft); return NULL; }
    memset(ft->slot, 0xff, ft->nslot * sizeof *ft->slot);
    size_t off = 0;
    for (uint32_t i = 0; i < nroots && off < len; i++) {
        size_t n = strnlen(roots + off, len - off);
        while (n > 1 && roots[off + n - 1] == '/') n--;        /* "/data/" -> "/data"; "/" stays */
        ft->root[i] = strndup(roots + off, n);
        if (!ft->root[i]) { gw_ft_free(ft); return NULL; }
        ft->rootlen[i] = n;
        ft->nroots = i + 1;
        off += strnlen(roots + off, len - off) + 1;
    }
    return ft;
}

static void ft_idle_unlink(gw_ft_t *ft, int32_t i) {
    ft_ent_t *e = &ft->ent[i];
    if (!e->idle) return;
    if (e->prev >= 0) ft->ent[e->prev].next = e->next; else ft->idle_head = e->next;
    if (e->next >= 0) ft->ent[e->next].prev = e->prev; else ft->idle_tail = e->prev;
    e->prev = e->next = -1;
    e->idle = 0;
}

static void ft_idle_push(gw_ft_t *ft, int32_t i) {
    ft_ent_t *e = &ft->ent[i];
    e->prev = ft->idle_tail;
    e->next = -1;
    if (ft->idle_tail >= 0) ft->ent[ft->idle_tail].next = i; else ft->idle_head = i;
    ft->idle_tail = i;
    e->idle = 1;
}

static void ft_close(gw_ft_t *ft, int32_t i) {
    ft_ent_t *e = &ft->ent[i];
    ft_idle_unlink(ft, i);
    if (e->fd >= 0) { close(e->fd); e->fd = -1; ft->nopen--; }
    if (e->dfd >= 0) close(e->dfd);
    e->dfd = -1;
}

static void ft_evict(gw_ft_t *ft) {
    while (ft->nopen > ft->max_open && ft->idle_head >= 0) ft_close(ft, ft->idle_head);
}

void gw_ft_free(gw_ft_t *ft) {
    if (!ft) return;
    for (uint32_t i = 0; i < ft->nent; i++) {
        if (ft->ent[i].fd >= 0) close(ft->ent[i].fd);
        if (ft->ent[i].dfd >= 0) close(ft->ent[i].dfd);
        free(ft->ent[i].key);
        free(ft->ent[i].real);
    }
    for (uint32_t i = 0; i < ft->nroots; i++) free(ft->root[i]);
    free(ft->root);
    free(ft->rootlen);
    free(ft->ent);
    free(ft->slot);
    pthread_mutex_destroy(&ft->mu);
    free(ft);
}

static int32_t ft_find(gw_ft_t *ft, const char *k, size_t n, uint64_t h, uint32_t *where) {
    uint32_t m = ft->nslot - 1, j = (uint32_t)h & m;
    for (;;) {
        int32_t i = ft->slot[j];
        if (i < 0) { if (where) *where = j; return -1; }
        ft_ent_t *e = &ft->ent[i];
        if (e->hash == h && e->klen == n && memcmp(e->key, k, n) == 0) return i;
        j = (j + 1) & m;
    }
}

static int ft_rehash(gw_ft_t *ft, uint32_t nslot) {
    int32_t *s = malloc((size_t)nslot * sizeof *s);
    if (!s) return -ENOMEM;
    memset(s, 0xff, (size_t)nslot * sizeof *s);
    for (uint32_t i = 0; i < ft->nent; i++) {
        if (!ft->ent[i].key) continue;   /* a free slot */
        uint32_t j = (uint32_t)ft->ent[i].hash & (nslot - 1);
        while (s[j] >= 0) j = (j + 1) & (nslot - 1);
        s[j] = (int32_t)i;
    }
    free(ft->slot);
    ft->slot = s;
    ft->nslot = nslot;
    return 0;
}

/* the table is full of paths (many names, one file): drop every entry nobody holds. The
 * slots of dropped entries go on a free list (key NULL); held entries keep their index,
 * which plans in flight hold. */
static int ft_drop_idle(gw_ft_t *ft) {
    for (uint32_t i = 0; i < ft->nent; i++) {
        ft_ent_t *e = &ft->ent[i];
        if (!e->key || e->refs != 0) continue;
        ft_close(ft, (int32_t)i);
        free(e->key);
        free(e->real);
        e->key = NULL;
        e->real = NULL;
        e->klen = 0;
        e->next = ft->free_head;
        ft->free_head = (int32_t)i;
        ft->nfree++;
    }
    return ft_rehash(ft, ft->nslot);
}

int gw_ft_learn(gw_ft_t *ft, const char *path, size_t plen, const char *real, size_t rlen, int direct) {
    int rc = 0;
    uint64_t h = ft_hash(path, plen);
    char *r = strndup(real, rlen);
    if (!r) return -ENOMEM;
    pthread_mutex_lock(&ft->mu);
    ft->resolves++;
    uint32_t where;
    int32_t i = ft_find(ft, path, plen, h, &where);
    if (i >= 0) {
        ft_ent_t *e = &ft->ent[i];
        if (!e->real || strcmp(e->real, r) != 0) {
            if (e->refs == 0) ft_close(ft, i);   /* a held one keeps its (checked) descriptor */
            free(e->real);
            e->real = r;
            r = NULL;
        }
        e->direct = direct;
        e->fresh = 1;
        goto out;
    }
    if (ft->nent - ft->nfree >= ft->max_paths) {
        if ((rc = ft_drop_idle(ft)) != 0) goto out;
        if (ft->nent - ft->nfree >= ft->max_paths) { rc = -ENOSPC; goto out; }
        ft_find(ft, path, plen, h, &where);
    }
    int32_t slot_i;
    if (ft->free_head >= 0) {        /* a dropped entry's slot */
        slot_i = ft->free_head;
        ft->free_head = ft->ent[slot_i].next;
        ft->nfree--;
        goto fill;
    }
    if (ft->nent == ft->capent) {
        uint32_t cap = ft->capent ? ft->capent * 2 : 256;
        ft_ent_t *n = realloc(ft->ent, (size_t)cap * sizeof *n);
        if (!n) { rc = -ENOMEM; goto out; }
        ft->ent = n;
        ft->capent = cap;
    }
    if ((uint64_t)(ft->nent + 1) * 2 > ft->nslot) {
        if ((rc = ft_rehash(ft, ft->nslot * 2)) != 0) goto out;
        ft_find(ft, path, plen, h, &where);
    }
    slot_i = (int32_t)ft->nent++;
fill:;
    ft_ent_t *e = &ft->ent[slot_i];
    memset(e, 0, sizeof *e);
    e->key = malloc(plen ? plen : 1);
    if (!e->key) {   /* back on the free list */
        e->next = ft->free_head;
        ft->free_head = slot_i;
        ft->nfree++;
        rc = -ENOMEM;
        goto out;
    }
    memcpy(e->key, path, plen);
    e->klen = (uint32_t)plen;
    e->hash = h;
    e->real = r;
    r = NULL;
    e->fd = -1;
    e->dfd = -1;
    e->prev = e->next = -1;
    e->direct = direct;
    e->fresh = 1;
    ft->slot[where] = slot_i;
out:
    pthread_mutex_unlock(&ft->mu);
    free(r);
    return rc;
}

void gw_ft_forget(gw_ft_t *ft, const char *path, size_t plen) {
    pthread_mutex_lock(&ft->mu);
    int32_t i = ft_find(ft, path, plen, ft_hash(path, plen), NULL);
    if (i >= 0) {
        ft_ent_t *e = &ft->ent[i];
        free(e->real);
        e->real = NULL;
        if (e->refs == 0) ft_close(ft, i);
    }
    pthread_mutex_unlock(&ft->mu);
}

static int ft_inside(gw_ft_t *ft, const char *p, size_t n) {
    for (uint32_t i = 0; i < ft->nroots; i++) {
        size_t m = ft->rootlen[i];
        if (m == 1 && ft->root[i][0] == '/') return p[0] == '/';
        if (n >= m && memcmp(p, ft->root[i], m) == 0 && (n == m || p[m] == '/')) return 1;
    }
    return 0;
}

/* the root `real` lies in (the longest one), or -1 */
static int ft_root_of(gw_ft_t *ft, const char *p, size_t n) {
    int best = -1;
    for (uint32_t i = 0; i < ft->nroots; i++) {
        size_t m = ft->rootlen[i];
        int in = (m == 1 && ft->root[i][0] == '/') ? p[0] == '/'
                 : n >= m && memcmp(p, ft->root[i], m) == 0 && (n == m || p[m] == '/');
        if (in && (best < 0 || m > ft->rootlen[best])) best = (int)i;
    }
    return best;
}

struct ft_open_how { uint64_t flags, mode, resolve; };   /* struct open_how (linux/openat2.h) */
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#define FT_RESOLVE_NO_MAGICLINKS 0x02
#define FT_RESOLVE_NO_SYMLINKS 0x04
#define FT_RESOLVE_BENEATH 0x08
static int ft_openat2_missing;   /* ENOSYS (old kernel, seccomp): walk component by component */

void gw_ft_use_openat2(int on) { __atomic_store_n(&ft_openat2_missing, !on, __ATOMIC_RELAXED); }

/* open the real path `real` (a realpath under a root: no symlink, no `..`) without following
 * anything: from the root's directory (opened by its path, O_NOFOLLOW, at each call: a root
 * replaced by a new directory is followed, as by a path open), every component a plain
 * directory or the file itself. A symlink met anywhere (a directory swapped for one since
 * the path was resolved) fails with ELOOP/ENOTDIR before anything it leads to is opened,
 * outside the root or not; so does a `.`/`..` component (EXDEV). fd, or -errno. */
static int open_beneath(const char *root, size_t rootlen, const char *real, int flags) {
    int fd = -1;
    if (strncmp(real, root, rootlen) != 0 || (rootlen > 1 && real[rootlen] && real[rootlen] != '/'))
        return -EXDEV;
    const char *rel = real + rootlen;
    while (*rel == '/') rel++;
    if (!*rel) return -EISDIR;                       /* the root itself */
    int dfd;
    do dfd = open(root, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    while (dfd < 0 && errno == EINTR);
    if (dfd < 0) return -errno;
    if (!__atomic_load_n(&ft_openat2_missing, __ATOMIC_RELAXED)) {
        struct ft_open_how how = {(uint64_t)(flags | O_NOFOLLOW | O_CLOEXEC), 0,
                                  FT_RESOLVE_BENEATH | FT_RESOLVE_NO_SYMLINKS | FT_RESOLVE_NO_MAGICLINKS};
        do fd = (int)syscall(SYS_openat2, dfd, rel, &how, sizeof how);
        while (fd < 0 && errno == EINTR);
        if (fd >= 0 || (errno != ENOSYS && errno != EPERM)) {   /* EPERM: a seccomp filter maybe */
            int e = errno;
            close(dfd);
            return fd >= 0 ? fd : -e;
        }
        if (errno == ENOSYS) __atomic_store_n(&ft_openat2_missing, 1, __ATOMIC_RELAXED);
    }
    /* the walk: O_PATH|O_NOFOLLOW|O_DIRECTORY per directory, the last one O_NOFOLLOW */
    int cur = dfd, e = 0;
    const char *c = rel;
    char name[256];
    for (;;) {
        const char *sl = strchr(c, '/');
        size_t len = sl ? (size_t)(sl - c) : strlen(c);
        if (len >= sizeof name) { e = ENAMETOOLONG; break; }
        memcpy(name, c, len);
        name[len] = 0;
        if (len == 0 || (len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.')) {
            if (len == 0 && sl) { c = sl + 1; continue; }   /* "a//b" */
            e = EXDEV;
            break;
        }
        if (!sl || !sl[1]) {                         /* the file */
            do fd = openat(cur, name, flags | O_NOFOLLOW | O_CLOEXEC);
            while (fd < 0 && errno == EINTR);
            e = fd < 0 ? errno : 0;
            break;
        }
        int nfd;
        do nfd = openat(cur, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        while (nfd < 0 && errno == EINTR);
        if (nfd < 0) { e = errno; break; }
        if (cur != dfd) close(cur);
        cur = nfd;
        c = sl + 1;
    }
    if (cur != dfd) close(cur);
    close(dfd);
    return e ? -e : fd;
}

static int ft_open_beneath(gw_ft_t *ft, const char *real, int flags) {
    int r = ft_root_of(ft, real, strlen(real));
    if (r < 0) return -EXDEV;
    return open_beneath(ft->root[r], ft->rootlen[r], real, flags);
}

int gw_fr_open_beneath(const char *root, const char *path, char *link, size_t cap, int64_t *linklen,
                       uint64_t *size) {
    size_t m = strlen(root);
    while (m > 1 && root[m - 1] == '/') m--;
    char r[4096];
    if (m >= sizeof r) return -ENAMETOOLONG;
    memcpy(r, root, m);
    r[m] = 0;
    int fd = open_beneath(r, m, path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return fd;
    return fr_checked(fd, link, cap, linklen, size);
}

/* open entry i (under the lock). GW_FT_OK, GW_FT_NEED (real path gone: resolve again) or a failure */
static int ft_open(gw_ft_t *ft, int32_t i, int *err) {
    ft_ent_t *e = &ft->ent[i];
    int fd;
    if (!e->direct && !e->fresh) {   /* reached through a symlink or another root: resolve again */
        free(e->real);
        e->real = NULL;
        *err = 0;
        return GW_FT_NEED;
    }
    e->fresh = 0;
    fd = ft_open_beneath(ft, e->real, O_RDONLY | O_NONBLOCK);
    if (fd < 0) {
        *err = -fd;
        if (*err == ENOENT || *err == ELOOP || *err == ENOTDIR || *err == EXDEV) {
            free(e->real);
            e->real = NULL;
            return GW_FT_NEED;
        }
        return GW_FT_OS;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) { *err = errno; close(fd); return GW_FT_OS; }
    if (S_ISDIR(sb.st_mode)) { close(fd); *err = EISDIR; return GW_FT_OS; }
    if (!S_ISREG(sb.st_mode)) { close(fd); *err = 0; return GW_FT_NOTREG; }
    char proc[40], link[4096];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    ssize_t r = readlink(proc, link, sizeof link - 1);
    if (r >= (ssize_t)sizeof link - 1) { close(fd); *err = ENAMETOOLONG; return GW_FT_OS; }
    if (r >= 0) {   /* where /proc is missing the O_NOFOLLOW open of the resolved path is all */
        link[r] = 0;
        if (link[0] != '/' || !ft_inside(ft, link, (size_t)r)) {
            close(fd);
            free(e->real);
            e->real = NULL;
            return GW_FT_OUTSIDE;
        }
    }
    e->fd = fd;
    e->size = (uint64_t)sb.st_size;
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);   /* 8 workers share it: not random reads */
    ft->nopen++;
    ft->opens++;
    return GW_FT_OK;
}

static void ft_release_locked(gw_ft_t *ft, gw_ft_plan_t *p) {
    for (uint32_t k = 0; k < p->nheld; k++) {
        int32_t i = p->held[k];
        ft_ent_t *e = &ft->ent[i];
        if (--e->refs == 0 && e->fd >= 0) ft_idle_push(ft, i);
    }
    p->nheld = 0;
    ft_evict(ft);
}

void gw_ft_release(gw_ft_t *ft, gw_ft_plan_t *p) {
    if (!p || !p->nheld) return;
    pthread_mutex_lock(&ft->mu);
    ft_release_locked(ft, p);
    pthread_mutex_unlock(&ft->mu);
}

void gw_ft_plan_free(gw_ft_t *ft, gw_ft_plan_t *p) {
    if (!p) return;
    gw_ft_release(ft, p);
    free(p->pieces);
    free(p->task_start);
    free(p->ranges);
    free(p->path);    /* one block: path, path_len, size, need, held, and the list's copy */
    free(p);
}

void gw_ft_stats(gw_ft_t *ft, uint64_t *out) {
    pthread_mutex_lock(&ft->mu);
    out[0] = ft->opens;
    out[1] = ft->nopen;
    out[2] = ft->nent - ft->nfree;
    out[3] = ft->resolves;
    out[4] = ft->direct_entries;
    out[5] = ft->direct_bytes;
    pthread_mutex_unlock(&ft->mu);
}

void gw_ft_set_direct(gw_ft_t *ft, int mode, int host) {
    pthread_mutex_lock(&ft->mu);
    ft->direct = mode;
    ft->host = host;
    pthread_mutex_unlock(&ft->mu);
}

/* (under the lock) the O_DIRECT descriptor of entry i, opened on first use: the real path
 * again, accepted only when it is the file the checked descriptor has open */
static int ft_direct_fd(gw_ft_t *ft, int32_t i) {
    ft_ent_t *e = &ft->ent[i];
    if (e->dfd != -1) return e->dfd;
    e->dfd = -2;
    if (!e->real) return -2;
    int fd;
    char proc[40];   /* the checked descriptor's file itself (no path walk); else beneath the root */
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", e->fd);
    do fd = open(proc, O_RDONLY | O_DIRECT | O_CLOEXEC | O_NONBLOCK);
    while (fd < 0 && errno == EINTR);
    if (fd < 0 && errno != EINVAL) fd = ft_open_beneath(ft, e->real, O_RDONLY | O_DIRECT | O_NONBLOCK);
    if (fd < 0) return -2;
    struct stat a, b;
    if (fstat(fd, &a) != 0 || fstat(e->fd, &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
        close(fd);
        return -2;
    }
    e->dfd = fd;
    return fd;
}

void gw_ft_set_max_paths(gw_ft_t *ft, uint32_t n) {
    pthread_mutex_lock(&ft->mu);
    ft->max_paths = n ? n : 1;
    pthread_mutex_unlock(&ft->mu);
}

void gw_ft_set_max_open(gw_ft_t *ft, uint32_t max_open) {
    pthread_mutex_lock(&ft->mu);
    ft->max_open = max_open ? max_open : 1;
    ft_evict(ft);
    pthread_mutex_unlock(&ft->mu);
}

typedef struct { uint64_t lo, hi; } ft_range_t;

static int ft_range_cmp(const void *a, const void *b) {
    const ft_range_t *x = a, *y = b;
    if (x->lo != y->lo) return x->lo < y->lo ? -1 : 1;
    return x->hi < y->hi ? -1 : (x->hi > y->hi);
}

static int ft_push(gw_ft_plan_t *p, uint64_t *cap, uint64_t dst, uint64_t off, uint64_t n, int fd, uint32_t tag,
                   int dfd, int host) {
    if (p->npieces == *cap) {
        uint64_t c = *cap * 2 + 16;
        gw_fr_piece_t *q = realloc(p->pieces, c * sizeof *q);
        if (!q) return -1;
        p->pieces = q;
        *cap = c;
    }
    gw_fr_piece_t *q = &p->pieces[p->npieces++];
    q->dst = dst; q->offset = off; q->nbytes = n; q->fd = fd; q->tag = tag;
    q->bfd = fd;
    q->flags = 0;
    if (dfd >= 0 && off % GW_FR_ALIGN == 0 && n % GW_FR_ALIGN == 0 && (!host || dst % GW_FR_ALIGN == 0)) {
        q->fd = dfd;
        q->flags = GW_FR_DIRECT;
    }
    return 0;
}

static int ft_task(gw_ft_plan_t *p, uint64_t *cap) {   /* the pieces so far end a task */
    if (p->ntasks + 1 >= *cap) {
        uint64_t c = *cap * 2 + 16;
        uint64_t *q = realloc(p->task_start, c * sizeof *q);
        if (!q) return -1;
        p->task_start = q;
        *cap = c;
    }
    p->task_start[++p->ntasks] = p->npieces;
    return 0;
}

static uint32_t rd32(const unsigned char *b) { uint32_t v; memcpy(&v, b, 4); return v; }
static uint64_t rd64(const unsigned char *b) { uint64_t v; memcpy(&v, b, 8); return v; }

#define ENTRY_BYTES 28   /* <QQQI: dst, offset, nbytes, path index */

gw_ft_plan_t *gw_ft_plan(gw_ft_t *ft, const void *req, size_t len, uint64_t count, uint64_t chunk,
                         uint64_t lo, uint64_t hi) {
    gw_ft_plan_t *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->bad_path = p->bad_entry = -1;
    const unsigned char *b = req;
    if (chunk == 0) chunk = 1;
    /* -- the path table */
    if (len < 4) { p->kind = GW_FT_BADREQ; return p; }
    uint32_t np = rd32(b);
    size_t off = 4;
    if ((uint64_t)np > (len - 4) / 4 || count > (uint64_t)len / ENTRY_BYTES + 1) { p->kind = GW_FT_BADREQ; return p; }
    size_t block = (size_t)np * (sizeof(char *) + 4 + 8 + 4 + 4) + len + 1 + 64;
    char *mem = malloc(block);
    if (!mem) { p->kind = GW_FT_NOMEM; return p; }
    p->path = (const char **)mem;
    p->size = (uint64_t *)(mem + (size_t)np * sizeof(char *));
    p->path_len = (uint32_t *)((char *)p->size + (size_t)np * 8);
    p->need = p->path_len + np;
    p->held = (int32_t *)(p->need + np);
    char *copy = (char *)(p->held + np);
    memcpy(copy, b, len);
    p->npaths = np;
    for (uint32_t i = 0; i < np; i++) {
        if (len - off < 4) { p->kind = GW_FT_BADREQ; return p; }
        uint32_t n = rd32(b + off);
        off += 4;
        if (len - off < n) { p->kind = GW_FT_BADREQ; return p; }
        p->path[i] = copy + off;
        p->path_len[i] = n;
        p->size[i] = 0;
        off += n;
    }
    if ((uint64_t)(len - off) != count * ENTRY_BYTES) { p->kind = GW_FT_BADREQ; return p; }
    const unsigned char *ents = b + off;
    for (uint64_t k = 0; k < count; k++)
        if (rd32(ents + k * ENTRY_BYTES + 24) >= np) { p->kind = GW_FT_BADREQ; return p; }

    pthread_mutex_lock(&ft->mu);
    /* -- every path known? (no file held yet) */
    int32_t *id = p->held;   /* path index -> entry, kept as the held list once all are open */
    for (uint32_t i = 0; i < np; i++) {
        int32_t e = ft_find(ft, p->path[i], p->path_len[i], ft_hash(p->path[i], p->path_len[i]), NULL);
        id[i] = e;
        if (e < 0 || !ft->ent[e].real) p->need[p->nneed++] = i;
    }
    if (p->nneed) { p->kind = GW_FT_NEED; pthread_mutex_unlock(&ft->mu); return p; }
    /* -- open each closed one (nothing held yet): every path to resolve again is collected,
     * so one more plan does (not one per path); the first other failure ends it */
    for (uint32_t i = 0; i < np; i++) {
        ft_ent_t *e = &ft->ent[id[i]];
        if (e->fd >= 0) continue;
        if (!e->real) { p->need[p->nneed++] = i; continue; }   /* a path repeated in the list */
        int err = 0, k = ft_open(ft, id[i], &err);
        if (k == GW_FT_OK) { ft_idle_push(ft, id[i]); continue; }   /* (held below) */
        if (k == GW_FT_NEED) { p->need[p->nneed++] = i; continue; }
        p->kind = k;
        p->err = err;
        p->bad_path = i;
        break;
    }
    if (p->kind != GW_FT_OK || p->nneed) {
        if (p->kind == GW_FT_OK) p->kind = GW_FT_NEED;
        else p->nneed = 0;
        ft_evict(ft);
        pthread_mutex_unlock(&ft->mu);
        return p;
    }
    /* -- hold each (under the lock: the descriptors, the sizes and the settings are copied
     * into the plan; the table may grow (realloc) once the lock is let go) */
    int *pfd = malloc((size_t)(np ? np : 1) * sizeof *pfd);
    if (!pfd) { p->kind = GW_FT_NOMEM; pthread_mutex_unlock(&ft->mu); return p; }
    for (uint32_t i = 0; i < np; i++) {
        ft_ent_t *e = &ft->ent[id[i]];
        ft_idle_unlink(ft, id[i]);
        e->refs++;
        p->nheld = i + 1;
        p->size[i] = e->size;
        pfd[i] = e->fd;
    }
    const int dmode = ft->direct, host = ft->host;
    uint64_t dentries = 0, dbytes = 0;
    pthread_mutex_unlock(&ft->mu);

    /* -- ranges and destinations (the files are held: their descriptors stay) */
    ft_range_t *rg = malloc((size_t)(count ? count : 1) * sizeof *rg);
    if (!rg) { p->kind = GW_FT_NOMEM; goto fail; }
    uint64_t nr = 0;
    for (uint64_t k = 0; k < count; k++) {
        const unsigned char *q = ents + k * ENTRY_BYTES;
        uint64_t dst = rd64(q), fo = rd64(q + 8), n = rd64(q + 16);
        uint32_t pi = rd32(q + 24);
        if (n > UINT64_MAX - fo || fo + n > p->size[pi]) {
            struct stat sb;   /* the file may have grown since it was opened */
            if (fstat(pfd[pi], &sb) == 0) p->size[pi] = (uint64_t)sb.st_size;
            if (n > UINT64_MAX - fo || fo + n > p->size[pi]) {
                p->kind = GW_FT_EOF;
                p->bad_path = pi; p->bad_entry = (int64_t)k; p->bad_offset = fo; p->bad_nbytes = n;
                p->bad_dst = dst; p->bad_size = p->size[pi];
                free(rg);
                goto fail;
            }
        }
        if (!n) continue;
        if (lo != hi && (dst < lo || dst > hi || n > hi - dst)) {
            p->kind = GW_FT_BADDST;
            p->bad_path = pi; p->bad_entry = (int64_t)k; p->bad_offset = fo; p->bad_nbytes = n; p->bad_dst = dst;
            free(rg);
            goto fail;
        }
        if (n > UINT64_MAX - dst) {
            p->kind = GW_FT_BADDST;
            p->bad_path = pi; p->bad_entry = (int64_t)k; p->bad_offset = fo; p->bad_nbytes = n; p->bad_dst = dst;
            free(rg);
            goto fail;
        }
        rg[nr].lo = dst;
        rg[nr].hi = dst + n;
        nr++;
        p->nbytes += n;
        p->nentries++;
    }
    /* -- overlaps, and the merged intervals */
    qsort(rg, nr, sizeof *rg, ft_range_cmp);
    for (uint64_t k = 1; k < nr && !p->serial; k++)
        if (rg[k].lo < rg[k - 1].hi) p->serial = 1;
    uint64_t m = 0;
    for (uint64_t k = 0; k < nr; k++) {
        if (m && rg[k].lo <= rg[m - 1].hi) {
            if (rg[k].hi > rg[m - 1].hi) rg[m - 1].hi = rg[k].hi;
        } else {
            rg[m++] = rg[k];
        }
    }
    p->ranges = (uint64_t *)rg;   /* ft_range_t is two uint64_t */
    p->nranges = m;
    /* -- tasks of at most chunk bytes (serial: one task, pieces of at most chunk, in order) */
    uint64_t pcap = 0, tcap = 0, used = 0;
    if (ft_task(p, &tcap)) { p->kind = GW_FT_NOMEM; goto fail; }
    p->ntasks = 0;
    p->task_start[0] = 0;
    for (uint64_t k = 0; k < count; k++) {
        const unsigned char *q = ents + k * ENTRY_BYTES;
        uint64_t dst = rd64(q), fo = rd64(q + 8), n = rd64(q + 16);
        uint32_t pi = rd32(q + 24);
        int fd = pfd[pi], dfd = -1;
        if (dmode && n >= (1u << 20)) {
            uint64_t res = 0, tot = 0;
            int cold = dmode == 2 || (gw_fr_resident(fd, fo, n, &res, &tot) == 0 && res * 2 < tot);
            if (cold) {
                pthread_mutex_lock(&ft->mu);
                dfd = ft_direct_fd(ft, id[pi]);
                pthread_mutex_unlock(&ft->mu);
                if (dfd >= 0) dentries++;
            }
        }
        uint64_t pos = 0;
        while (pos < n) {
            uint64_t take = n - pos;
            if (p->serial) { if (take > chunk) take = chunk; }
            else if (take > chunk - used) take = chunk - used;
            if (dfd >= 0 && take < n - pos) {   /* a split of a direct entry: the next piece aligned */
                uint64_t rem = (fo + pos + take) % GW_FR_ALIGN;
                if (rem < take) {
                    take -= rem;
                } else if (!p->serial && used > 0) {   /* no room for an aligned piece: next task */
                    if (ft_task(p, &tcap)) { p->kind = GW_FT_NOMEM; goto fail; }
                    used = 0;
                    continue;
                }
            }
            if (ft_push(p, &pcap, dst + pos, fo + pos, take, fd, pi, dfd, host)) { p->kind = GW_FT_NOMEM; goto fail; }
            if (p->pieces[p->npieces - 1].flags & GW_FR_DIRECT) dbytes += take;
            pos += take;
            used += take;
            if (!p->serial && used >= chunk) {
                if (ft_task(p, &tcap)) { p->kind = GW_FT_NOMEM; goto fail; }
                used = 0;
            }
        }
    }
    if (p->npieces > p->task_start[p->ntasks] && ft_task(p, &tcap)) { p->kind = GW_FT_NOMEM; goto fail; }
    free(pfd);
    pthread_mutex_lock(&ft->mu);
    ft->direct_entries += dentries;
    ft->direct_bytes += dbytes;
    pthread_mutex_unlock(&ft->mu);
    return p;
fail:
    free(pfd);
    gw_ft_release(ft, p);
    return p;
}

int gw_ft_plan_fd(gw_ft_t *ft, gw_ft_plan_t *p, uint32_t i) {
    if (!p || p->kind != GW_FT_OK || i >= p->nheld) return -1;
    pthread_mutex_lock(&ft->mu);
    int fd = ft->ent[p->held[i]].fd;
    pthread_mutex_unlock(&ft->mu);
    return fd;
}

int gw_fr_resident(int fd, uint64_t offset, uint64_t len, uint64_t *resident, uint64_t *total) {
    *resident = *total = 0;
    if (len == 0) return 0;
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0) pg = 4096;
    uint64_t start = offset - offset % (uint64_t)pg, span = offset + len - start;
    struct stat sb;
    if (fstat(fd, &sb) != 0) return -errno;
    if ((uint64_t)sb.st_size <= start) return 0;
    if (start + span > (uint64_t)sb.st_size) span = (uint64_t)sb.st_size - start;
    void *m = mmap(NULL, (size_t)span, PROT_READ, MAP_SHARED, fd, (off_t)start);
    if (m == MAP_FAILED) return -errno;
    uint64_t n = (span + (uint64_t)pg - 1) / (uint64_t)pg, got = 0, asked = 0;
    unsigned char vec[GW_FR_RESIDENT_SAMPLES];
    int rc = 0;
    if (n <= GW_FR_RESIDENT_SAMPLES) {          /* every page: one call */
        if (mincore(m, (size_t)span, vec) != 0) rc = -errno;
        else for (uint64_t i = 0; i < n; i++) got += vec[i] & 1;
        asked = n;
    } else {                                    /* evenly spaced pages: a page cache walk of
                                                 * every page costs ~1 ms per 64 MiB */
        for (uint64_t k = 0; k < GW_FR_RESIDENT_SAMPLES; k++) {
            uint64_t page = k * n / GW_FR_RESIDENT_SAMPLES;
            if (mincore((char *)m + page * (uint64_t)pg, (size_t)pg, vec) != 0) { rc = -errno; break; }
            got += vec[0] & 1;
            asked++;
        }
    }
    munmap(m, (size_t)span);
    *resident = got;
    *total = asked;
    return rc;
}
