/* gpuwire remote file reads, the per-piece loop in C (gpuwire._files; see docs/gds.md).
 *
 * The server's read workers (gpuwire/gds/service.py) hand a task -- a batch of pieces
 * already checked (by the file table below: descriptor open under a data root, range
 * inside the file) -- to one call here; cffi releases the GIL for it, so the 8 workers read in parallel
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
    int32_t bfd;         /* the buffered descriptor (== fd unless fd is an O_DIRECT one) */
    uint32_t flags;      /* GW_FR_DIRECT: fd is O_DIRECT (offset and nbytes are 4 KiB multiples) */
} gw_fr_piece_t;

#define GW_FR_DIRECT 1
#define GW_FR_ALIGN 4096

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
/* the same for `path`, a real path under the real path `root`, opened without following
 * anything (from root, O_NOFOLLOW at every component; openat2 RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS where the kernel has it): a symlink on the way fails (-ELOOP /
 * -ENOTDIR) before what it leads to is opened; -EXDEV where path is not under root.
 * Regular files only (O_NONBLOCK; -EISDIR, -EINVAL otherwise). */
int gw_fr_open_beneath(const char *root, const char *path, char *link, size_t cap, int64_t *linklen,
                       uint64_t *size);

/* page-cache residency of fd[offset, offset+len) (mmap + mincore, nothing is read):
 * *resident of *total pages looked at -- every page of a range of at most
 * GW_FR_RESIDENT_SAMPLES pages, else that many evenly spaced ones. 0, or -errno. */
#define GW_FR_RESIDENT_SAMPLES 16
int gw_fr_resident(int fd, uint64_t offset, uint64_t len, uint64_t *resident, uint64_t *total);

/* host mode: pread each piece to its dst (a host address). Returns the kind (0 ok). */
int gw_fr_read_host(const gw_fr_piece_t *p, size_t n, const volatile int *cancel, gw_fr_status_t *st);

/* GPU mode (the calling thread's current context is used): pread into `staging`
 * (cap bytes, pinned) and copy with cuMemcpyHtoDAsync on `stream` (a CUstream);
 * the stream is synchronized before staging is refilled and before returning, also
 * after a failure (queued copies still read staging). Returns the kind (0 ok). */
int gw_fr_read_gpu(const gw_fr_piece_t *p, size_t n, uint64_t staging, uint64_t cap, uint64_t stream,
                   const volatile int *cancel, gw_fr_status_t *st);


/* ---------------------------------------------------------------- the file table
 * The per-file work of a gwFileReadV, in C (one call per request list, GIL released):
 * the request list is parsed, every path looked up in a table of validated paths
 * (client path -> real path, open descriptor, size), files opened (or reopened after
 * eviction) and checked, ranges checked, destinations checked, overlaps found, and the
 * entries split into tasks for the read workers.
 *
 * Validation: a client path enters the table only through gw_ft_learn, with the real
 * path Python resolved for it (gpuwire.gds.roots.DataRoots: realpath inside a root).
 * Every open -- the first one and every reopen after eviction -- opens that real path
 * beneath its root following nothing (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, or
 * a walk with O_NOFOLLOW per component where the kernel lacks openat2), so a file or
 * directory swapped for a symlink fails before anything it leads to is opened, and
 * checks what /proc/self/fd names as opened against the roots (prefix at a separator).
 * Where the real path no longer opens so (ENOENT, ELOOP, ENOTDIR, EXDEV) it is forgotten
 * and the plan asks Python to resolve the path again (GW_FT_NEED: every such path of the
 * list at once; nothing is held then). */
typedef struct gw_ft gw_ft_t;

#define GW_FT_OK 0
#define GW_FT_NEED 1      /* paths need[0..nneed) must be resolved (gw_ft_learn), then plan again */
#define GW_FT_BADREQ 2    /* malformed request list: Python re-parses it to name the fault */
#define GW_FT_OS 3        /* open/fstat of path failed: err is errno */
#define GW_FT_OUTSIDE 4   /* what was opened for path lies outside the roots */
#define GW_FT_EOF 5       /* entry past the end of path's file: offset, nbytes, size */
#define GW_FT_BADDST 6    /* entry's destination outside [lo, hi): dst, nbytes */
#define GW_FT_NOTREG 7    /* path is not a regular file */
#define GW_FT_NOMEM 8

typedef struct {
    gw_fr_piece_t *pieces;   /* tag = the piece's path index */
    uint64_t npieces;
    uint64_t *task_start;    /* task k: pieces[task_start[k] .. task_start[k+1]) */
    uint64_t ntasks;
    uint64_t *ranges;        /* destination intervals (lo, hi), sorted, touching ones merged */
    uint64_t nranges;
    uint64_t nbytes;         /* bytes of the non-empty entries */
    uint64_t nentries;       /* non-empty entries */
    int32_t serial;          /* some entries overwrite others: one task, in call order */
    uint32_t npaths;
    const char **path;       /* the path table (pointers into the plan's copy of the list) */
    uint32_t *path_len;
    uint64_t *size;          /* per path: the file's size (once opened) */
    uint32_t *need;          /* GW_FT_NEED: path indices to resolve */
    uint32_t nneed;
    /* the failure (kind != GW_FT_OK): path index, errno, entry fields */
    int32_t kind;
    int32_t err;
    int64_t bad_path;
    int64_t bad_entry;
    uint64_t bad_offset, bad_nbytes, bad_dst, bad_size;
    /* internal: the table entries this plan holds open */
    int32_t *held;
    uint32_t nheld;
} gw_ft_plan_t;

/* roots: `nroots` real paths, each NUL-terminated, back to back. max_open: idle open files kept.
 * direct: 0 off, 1 auto (entries of at least 1 MiB whose range is mostly not in the page
 * cache, by mincore), 2 on: such entries are read through a second, O_DIRECT descriptor of
 * the same file (same st_dev/st_ino as the checked one), in 4 KiB-aligned pieces; the rest
 * (unaligned heads and tails, warm ranges, filesystems without O_DIRECT) buffered.
 * host: destinations are host memory (pieces go direct only where dst is aligned too). */
gw_ft_t *gw_ft_new(const char *roots, size_t len, uint32_t nroots, uint32_t max_open);
void gw_ft_set_direct(gw_ft_t *ft, int mode, int host);
void gw_ft_free(gw_ft_t *ft);             /* closes every descriptor (no plan may be in flight) */
/* client path -> real path (resolved and checked by the caller). 0, or -ENOSPC / -ENOMEM.
 * direct: the real path is the path itself under the first root (no symlink, no `..`, no
 * other root): a reopen of the real path is what a fresh resolve would open. Otherwise
 * (indirect) every reopen after eviction asks for a fresh resolve (GW_FT_NEED) first. */
int gw_ft_learn(gw_ft_t *ft, const char *path, size_t plen, const char *real, size_t rlen, int direct);
void gw_ft_forget(gw_ft_t *ft, const char *path, size_t plen);
/* plan one request list (see gw_files.h's comment above; the format of pack_reads).
 * chunk: task size; [lo, hi): where destinations must lie (lo == hi: unchecked).
 * Never NULL except out of memory; on failure no file is held. */
gw_ft_plan_t *gw_ft_plan(gw_ft_t *ft, const void *req, size_t len, uint64_t count, uint64_t chunk,
                         uint64_t lo, uint64_t hi);
/* the plan's files are no longer read: idle files beyond max_open are closed. Idempotent. */
void gw_ft_release(gw_ft_t *ft, gw_ft_plan_t *plan);
void gw_ft_plan_free(gw_ft_t *ft, gw_ft_plan_t *plan);   /* releases first */
/* the descriptor of path `i` of a planned (GW_FT_OK) plan, held until the plan is released; -1 */
int gw_ft_plan_fd(gw_ft_t *ft, gw_ft_plan_t *plan, uint32_t i);
/* counters: [0] opens, [1] open descriptors, [2] known paths, [3] resolves asked for,
 * [4] entries read with Direct I/O, [5] bytes of pieces read with Direct I/O */
void gw_ft_stats(gw_ft_t *ft, uint64_t *out6);
void gw_ft_set_max_open(gw_ft_t *ft, uint32_t max_open);
/* paths the table remembers (default 2^20); when full, the ones no plan holds are dropped */
void gw_ft_set_max_paths(gw_ft_t *ft, uint32_t n);
/* opens use openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) where the kernel has it (1, the
 * default; it turns itself off at ENOSYS), else (0) a walk with O_NOFOLLOW per component */
void gw_ft_use_openat2(int on);

#endif
