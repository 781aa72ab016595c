/* gpuwire pinned-region registry (module gpuwire._pinned, cffi API mode, out of line).
 *
 * The client keeps every pinned host region (cuMemHostAlloc / cuMemHostRegister through
 * gpuwire) here: a sorted array of non-overlapping [start, end) ranges with the address
 * of the region's server mirror. At each launch gw_pin_scan looks every 8-byte
 * parameter slot up (binary search, O(log n)) and reports the slots whose value lies
 * inside a region (interior pointers included) or is its one-past-the-end address,
 * with the value rewritten to the mirror at the same offset.
 *
 * gw_pin_diff finds the changed part of a region against its shadow copy (the
 * "compare" tracking mode) and refreshes the shadow; gw_pin_lock page-locks memory.
 * No dependencies beyond libc.
 */
#ifndef GW_PINNED_H
#define GW_PINNED_H
#include <stddef.h>
#include <stdint.h>

#define GW_PIN_ABI 1

typedef struct gw_pin_reg gw_pin_reg_t;

typedef struct {
    uint32_t slot;      /* index into the offsets array given to gw_pin_scan */
    uint32_t id;        /* region id */
    uint64_t value;     /* the rewritten value: mirror + (old - start) */
} gw_pin_hit_t;

gw_pin_reg_t *gw_pin_new(void);
void gw_pin_destroy(gw_pin_reg_t *r);
/* 0 ok, -1 overlaps a registered region (or empty/wrapping range), -2 out of memory */
int gw_pin_add(gw_pin_reg_t *r, uint64_t start, uint64_t len, uint64_t mirror, uint32_t id);
/* 0 ok, -1 no region starts at start */
int gw_pin_remove(gw_pin_reg_t *r, uint64_t start);
size_t gw_pin_count(const gw_pin_reg_t *r);
/* id of the region holding addr (end == one past the end counts when ends is set), else -1;
 * *off receives addr - start */
int64_t gw_pin_find(const gw_pin_reg_t *r, uint64_t addr, int ends, uint64_t *off);
/* 1 when [addr, addr + n) lies inside one region */
int gw_pin_covers(const gw_pin_reg_t *r, uint64_t addr, uint64_t n);
/* Look up the 8-byte values at params + offs[i] (i < noffs; offsets past plen - 8 are
 * skipped). Fills up to cap hits and returns how many slots hit (may exceed cap: call
 * again with room). */
int gw_pin_scan(const gw_pin_reg_t *r, const uint8_t *params, size_t plen, const uint32_t *offs,
                size_t noffs, gw_pin_hit_t *hits, size_t cap);
/* Like gw_pin_scan, and writes each hit's rewritten value into params (in place). */
int gw_pin_rewrite(const gw_pin_reg_t *r, uint8_t *params, size_t plen, const uint32_t *offs,
                   size_t noffs, gw_pin_hit_t *hits, size_t cap);
/* bench: looks each of vals[0..n) up iters times; returns the number of hits */
uint64_t gw_pin_bench_find(const gw_pin_reg_t *r, const uint64_t *vals, size_t n, size_t iters);

/* compare mode: the changed byte range of live vs shadow (granule-rounded), copied into
 * shadow; returns 0 and sets *lo = *hi when nothing changed */
int gw_pin_diff(uint8_t *shadow, const uint8_t *live, size_t n, size_t *lo, size_t *hi);
/* Multi-threaded versions for big regions (>= 1 MiB, compare mode): a small persistent pool of
 * gw_pin_threads(n) threads (n <= 16; 0 or 1: the caller's thread only; reset in a forked
 * child). gw_pin_diff_mt: like gw_pin_diff; gw_pin_span_mt: the same span without copying
 * (0 and *lo = *hi = n when equal); gw_pin_copy_mt: memcpy. */
int gw_pin_threads(int n);
/* Workers spin spin_ns after each job before sleeping (0: sleep at once): a job that follows
 * soon finds them awake instead of paying a wake-up. gw_pin_arm(ns): wake sleeping workers
 * now and let them spin for up to ns (a job is expected soon, e.g. a copy after a sync). */
void gw_pin_spin(uint64_t spin_ns);
/* An async gw_pin_span_mt on the workers alone, so the caller can drive the network meanwhile:
 * gw_pin_span_start returns 0 once started (-1: no workers or n < 1 MiB; nothing started), then
 * poll gw_pin_job_done and end with gw_pin_span_finish (its result as gw_pin_span_mt's). No other
 * gw_pin_*_mt call may be made by the starting thread in between (they would wait for it). */
int gw_pin_span_start(const uint8_t *shadow, const uint8_t *live, size_t n);
int gw_pin_job_done(void);
int gw_pin_span_finish(size_t n, size_t *lo, size_t *hi);
void gw_pin_arm(uint64_t ns);
int gw_pin_diff_mt(uint8_t *shadow, const uint8_t *live, size_t n, size_t *lo, size_t *hi);
int gw_pin_span_mt(const uint8_t *shadow, const uint8_t *live, size_t n, size_t *lo, size_t *hi);
void gw_pin_copy_mt(uint8_t *dst, const uint8_t *src, size_t n);

/* "protect" tracking (opt-in): write-protected regions whose first host write is caught by
 * a SIGSEGV handler (chained to the one installed before it), which makes the range
 * writable again and sets its dirty flag. start/len must cover whole pages owned by the
 * region. gw_wp_add returns a slot (>= 0) or -1 (table full) / -errno (sigaction). */
int gw_wp_add(uint64_t start, uint64_t len);
void gw_wp_remove(int slot);
/* clears the dirty flag and write-protects: 0 or errno */
int gw_wp_protect(int slot);
/* makes the range writable (dirty flag unchanged): 0 or errno */
int gw_wp_unprotect(int slot);
/* 1 when the range was written since gw_wp_protect (or is not protected), else 0 */
int gw_wp_dirty(int slot);
/* granule mode (gran bytes, a multiple of the page size, at most 1024 granules; 0: off): the
 * first write fault after gw_wp_protect / gw_wp_take unprotects only its granule and marks it
 * written; a second fault unprotects the whole region (as without granules). 0 or an errno. */
int gw_wp_set_granule(int slot, uint64_t gran);
/* granule mode: the written granules since the last protect/take, merged into runs of byte
 * offsets (runs[2i], runs[2i+1]) from the slot's start, at most cap runs; they are
 * write-protected again (and their marks cleared) before it returns, so the caller copies them
 * after. Returns the number of runs (0: nothing written), or -1: push the whole region and
 * gw_wp_protect it (unprotected whole, no granule mode, or more than cap runs). */
int gw_wp_take(int slot, uint64_t *runs, int cap);
/* number of write faults the handler resolved (all slots, since load) */
uint64_t gw_wp_faults(void);
/* which mechanism protects: 1 a userfaultfd in synchronous mode with a handler thread (system
 * calls may write into protected regions; needs the right to handle kernel-mode faults), 0
 * mprotect + the SIGSEGV handler (a system call writing into a protected region gets EFAULT).
 * Probed once, end to end (at the first gw_wp_add or gw_wp_backend). */
int gw_wp_backend(void);
/* before that probe: 0 forces the mprotect backend (setting pinned_protect_uffd); returns 0,
 * or -1 when the backend was chosen already (the call changes nothing then) */
int gw_wp_use_uffd(int on);
/* userfaultfd backend: its handler thread polls without sleeping for the next ns nanoseconds
 * (woken now if it sleeps), so a store in that time costs the writer's wake-up only (the
 * client calls it where pinned_spin_us applies, when a sync re-protected regions). No-op for
 * the mprotect backend or ns == 0. */
void gw_wp_spin(uint64_t ns);
/* "written" tracking (the default where the kernel has it, Linux >= 6.7): the kernel itself
 * records which pages were written. One userfaultfd per process in asynchronous write-protect
 * mode (UFFD_FEATURE_WP_ASYNC: a write to a protected page is resolved by the kernel at once,
 * no handler thread, no signal, and system calls writing into the page work), and
 * PAGEMAP_SCAN on /proc/self/pagemap to read (and re-protect) the written pages.
 * gw_uf_init: 0 when usable (probed end to end on a scratch page), else a positive errno
 * (ENOSYS: no userfaultfd; EPERM: not allowed; EOPNOTSUPP: no async write-protect or no
 * PAGEMAP_SCAN); the result is kept (later calls return it). Ranges must be page-aligned. */
int gw_uf_init(void);
/* register [start, start + len) for write-protect tracking: 0 or errno (EINVAL: memory the
 * kernel cannot track this way, e.g. a file mapping; EBUSY: another userfaultfd has it) */
int gw_uf_register(uint64_t start, uint64_t len);
/* unprotect and unregister: 0 or errno */
int gw_uf_unregister(uint64_t start, uint64_t len);
/* write-protect (on = 1: later writes are recorded) or unprotect (on = 0: the pages count as
 * written): 0 or errno */
int gw_uf_protect(uint64_t start, uint64_t len, int on);
/* The written pages of [start, start + len) as at most max ranges (start, end pairs into
 * out[2 * max]; ranges beyond max are merged into the last one), with rewp: write-protected
 * again in the same walk. Returns the number of ranges (0: nothing written) or -errno. */
long gw_uf_scan(uint64_t start, uint64_t len, int rewp, uint64_t *out, long max);
/* the pagemap scan calls made (all ranges, since load) */
uint64_t gw_uf_scans(void);
/* mlock / munlock: 0 or errno */
int gw_pin_lock(void *p, size_t n);
int gw_pin_unlock(void *p, size_t n);

#endif
