/* gpuwire pinned-region registry: see gw_pinned.h. */
#define _GNU_SOURCE
#include "gw_pinned.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>

typedef struct {
    uint64_t start, end, mirror;
    uint32_t id;
    uint32_t pad;
} ent_t;

struct gw_pin_reg {
    uint64_t *starts;  /* sorted; separate array keeps the binary search in few cache lines */
    ent_t *e;
    size_t n, cap;
};

gw_pin_reg_t *gw_pin_new(void) {
    return calloc(1, sizeof(gw_pin_reg_t));
}

void gw_pin_destroy(gw_pin_reg_t *r) {
    if (!r) return;
    free(r->starts);
    free(r->e);
    free(r);
}

size_t gw_pin_count(const gw_pin_reg_t *r) { return r->n; }

/* index of the last region with start <= a, or -1 */
static inline long last_le(const gw_pin_reg_t *r, uint64_t a) {
    size_t lo = 0, hi = r->n;           /* answer in [lo, hi) ... search first start > a */
    const uint64_t *s = r->starts;
    while (lo < hi) {
        size_t mid = (lo + hi) >> 1;
        if (s[mid] <= a) lo = mid + 1;
        else hi = mid;
    }
    return (long)lo - 1;
}

int gw_pin_add(gw_pin_reg_t *r, uint64_t start, uint64_t len, uint64_t mirror, uint32_t id) {
    if (len == 0 || start + len < start) return -1;
    long i = last_le(r, start);
    if (i >= 0 && r->e[i].end > start) return -1;
    size_t k = (size_t)(i + 1);
    if (k < r->n && r->starts[k] < start + len) return -1;
    if (r->n == r->cap) {
        size_t nc = r->cap ? r->cap * 2 : 64;
        uint64_t *ns = realloc(r->starts, nc * sizeof(uint64_t));
        if (!ns) return -2;
        r->starts = ns;
        ent_t *ne = realloc(r->e, nc * sizeof(ent_t));
        if (!ne) return -2;
        r->e = ne;
        r->cap = nc;
    }
    memmove(r->starts + k + 1, r->starts + k, (r->n - k) * sizeof(uint64_t));
    memmove(r->e + k + 1, r->e + k, (r->n - k) * sizeof(ent_t));
    r->starts[k] = start;
    r->e[k].start = start;
    r->e[k].end = start + len;
    r->e[k].mirror = mirror;
    r->e[k].id = id;
    r->e[k].pad = 0;
    r->n++;
    return 0;
}

int gw_pin_remove(gw_pin_reg_t *r, uint64_t start) {
    long i = last_le(r, start);
    if (i < 0 || r->starts[i] != start) return -1;
    size_t k = (size_t)i;
    memmove(r->starts + k, r->starts + k + 1, (r->n - k - 1) * sizeof(uint64_t));
    memmove(r->e + k, r->e + k + 1, (r->n - k - 1) * sizeof(ent_t));
    r->n--;
    return 0;
}

static inline const ent_t *find(const gw_pin_reg_t *r, uint64_t a, int ends) {
    long i = last_le(r, a);
    if (i < 0) return NULL;
    const ent_t *e = &r->e[i];
    if (a < e->end || (ends && a == e->end)) return e;
    return NULL;
}

int64_t gw_pin_find(const gw_pin_reg_t *r, uint64_t addr, int ends, uint64_t *off) {
    const ent_t *e = find(r, addr, ends);
    if (!e) return -1;
    if (off) *off = addr - e->start;
    return e->id;
}

int gw_pin_covers(const gw_pin_reg_t *r, uint64_t addr, uint64_t n) {
    const ent_t *e = find(r, addr, 0);
    return e && addr + n <= e->end && addr + n >= addr;
}

int gw_pin_scan(const gw_pin_reg_t *r, const uint8_t *params, size_t plen, const uint32_t *offs,
                size_t noffs, gw_pin_hit_t *hits, size_t cap) {
    if (r->n == 0 || plen < 8) return 0;
    int nh = 0;
    uint64_t lo = r->e[0].start, hi = r->e[r->n - 1].end;   /* quick reject */
    for (size_t i = 0; i < noffs; i++) {
        size_t o = offs[i];
        if (o > plen - 8) continue;
        uint64_t v;
        memcpy(&v, params + o, 8);
        if (v < lo || v > hi) continue;
        const ent_t *e = find(r, v, 1);
        if (!e) continue;
        if ((size_t)nh < cap) {
            hits[nh].slot = (uint32_t)i;
            hits[nh].id = e->id;
            hits[nh].value = e->mirror + (v - e->start);
        }
        nh++;
    }
    return nh;
}

int gw_pin_rewrite(const gw_pin_reg_t *r, uint8_t *params, size_t plen, const uint32_t *offs,
                   size_t noffs, gw_pin_hit_t *hits, size_t cap) {
    int nh = gw_pin_scan(r, params, plen, offs, noffs, hits, cap);
    int k = (size_t)nh < cap ? nh : (int)cap;
    for (int i = 0; i < k; i++)
        memcpy(params + offs[hits[i].slot], &hits[i].value, 8);
    return nh;
}

uint64_t gw_pin_bench_find(const gw_pin_reg_t *r, const uint64_t *vals, size_t n, size_t iters) {
    uint64_t hits = 0;
    for (size_t it = 0; it < iters; it++)
        for (size_t i = 0; i < n; i++)
            hits += find(r, vals[i], 1) != NULL;
    return hits;
}

#define GRAN 4096

int gw_pin_diff(uint8_t *shadow, const uint8_t *live, size_t n, size_t *lo, size_t *hi) {
    size_t a = 0, b = n;
    while (a < n) {
        size_t k = n - a < GRAN ? n - a : GRAN;
        if (memcmp(shadow + a, live + a, k)) break;
        a += k;
    }
    if (a >= n) {
        *lo = *hi = n;
        return 0;
    }
    while (b > a) {
        size_t s = (b - 1) / GRAN * GRAN;   /* granule-aligned chunk ending at b */
        if (s < a) s = a;
        if (memcmp(shadow + s, live + s, b - s)) break;
        b = s;
    }
    memcpy(shadow + a, live + a, b - a);
    *lo = a;
    *hi = b;
    return 1;
}

/* ---------------------------------------------------------------- thread pool (compare mode) */
#define MT_MAX 16
#define MT_MIN (1u << 20)      /* below this the caller's thread does it alone */

enum { JOB_SPAN = 1, JOB_COPY = 2 };

static struct {
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    pthread_t th[MT_MAX];
    int nth;                    /* workers running (parts = nth + 1) */
    int want;
    uint64_t gen;
    int pending;
    int kind;
    uint8_t *dst;
    const uint8_t *a, *b;
    size_t n, parts;
    size_t lo[MT_MAX + 1], hi[MT_MAX + 1];
    uint64_t g0[MT_MAX + 1];    /* the job generation a worker was created at */
    int atfork;
    int shift;                  /* 1: an async job, worker k runs part k - 1 (the caller none) */
    uint64_t spin_ns;           /* workers spin this long after a job before sleeping */
    uint64_t spin_until;        /* gw_pin_arm: workers spin until then (monotonic ns) */
} mt = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

static pthread_mutex_t mt_call = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* with mt.mu held: spin (unlocked) until the job generation moves past seen or the spin
 * deadline passes; returns with mt.mu held */
static void spin_for_job(uint64_t seen, uint64_t until) {
    if (!until) return;
    pthread_mutex_unlock(&mt.mu);
    uint64_t n = 0;
    for (;;) {
        if (__atomic_load_n(&mt.gen, __ATOMIC_ACQUIRE) != seen) break;
        if ((++n & 63) == 0 && now_ns() >= until) break;
        cpu_relax();
    }
    pthread_mutex_lock(&mt.mu);
}

/* first and last differing granule of a[s, e) vs b[s, e): lo = hi = e when equal */
static void span_part(const uint8_t *a, const uint8_t *b, size_t s, size_t e, size_t *lo, size_t *hi) {
    size_t x = s;
    while (x < e) {
        size_t k = e - x < GRAN ? e - x : GRAN;
        if (memcmp(a + x, b + x, k)) break;
        x += k;
    }
    if (x >= e) {
        *lo = *hi = e;
        return;
    }
    size_t y = e;
    while (y > x) {
        size_t c = (y - 1) / GRAN * GRAN;
        if (c < x) c = x;
        if (memcmp(a + c, b + c, y - c)) break;
        y = c;
    }
    *lo = x;
    *hi = y;
}

static void part_bounds(size_t k, size_t parts, size_t n, size_t *s, size_t *e) {
    size_t g = (n + GRAN - 1) / GRAN;
    *s = g * k / parts * GRAN;
    *e = g * (k + 1) / parts * GRAN;
    if (*s > n) *s = n;
    if (*e > n) *e = n;
}

/* The span a finished JOB_SPAN found: [lo, hi) over the parts that differ; 0 (and
 * *lo = *hi = n) when none does. Called with mt_call held. */
static int mt_span_result(size_t n, size_t *lo, size_t *hi) {
    size_t a = n, b = 0;
    for (size_t k = 0; k < mt.parts; k++) {
        size_t s, e;
        part_bounds(k, mt.parts, n, &s, &e);
        if (mt.lo[k] < e) {             /* this part differs */
            if (mt.lo[k] < a) a = mt.lo[k];
            if (mt.hi[k] > b) b = mt.hi[k];
        }
    }
    if (a >= b) {
        *lo = *hi = n;
        return 0;
    }
    *lo = a;
    *hi = b;
    return 1;
}

static void run_part(size_t k) {
    size_t s, e;
    part_bounds(k, mt.parts, mt.n, &s, &e);
    if (mt.kind == JOB_SPAN)
        span_part(mt.a, mt.b, s, e, &mt.lo[k], &mt.hi[k]);
    else if (e > s)
        memcpy(mt.dst + s, mt.a + s, e - s);
}

static void *mt_worker(void *arg) {
    size_t k = (size_t)(uintptr_t)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&mt.mu);
    seen = mt.g0[k];
    uint64_t after_job = 0;      /* spin deadline after the last job */
    for (;;) {
        while (mt.gen == seen && (int)k <= mt.nth) {
            uint64_t until = after_job > mt.spin_until ? after_job : mt.spin_until;
            if (until && now_ns() < until) {
                spin_for_job(seen, until);
                after_job = 0;
                continue;
            }
            pthread_cond_wait(&mt.start, &mt.mu);
        }
        if ((int)k > mt.nth) break;
        seen = mt.gen;
        size_t part = k - (size_t)mt.shift;
        int mine = part < mt.parts;
        pthread_mutex_unlock(&mt.mu);
        if (mine) run_part(part);
        pthread_mutex_lock(&mt.mu);
        if (mine && --mt.pending == 0) pthread_cond_signal(&mt.done);
        after_job = mt.spin_ns ? now_ns() + mt.spin_ns : 0;
    }
    pthread_mutex_unlock(&mt.mu);
    return NULL;
}

static void mt_child(void) {     /* a forked child has no workers: start over */
    pthread_mutex_init(&mt.mu, NULL);
    pthread_cond_init(&mt.start, NULL);
    pthread_cond_init(&mt.done, NULL);
    pthread_mutex_init(&mt_call, NULL);
    mt.nth = 0;
    mt.pending = 0;
    mt.shift = 0;
}

int gw_pin_threads(int n) {
    if (n < 1) n = 1;
    if (n > MT_MAX) n = MT_MAX;
    pthread_mutex_lock(&mt_call);      /* not while a job runs: its parts are given out by nth */
    pthread_mutex_lock(&mt.mu);
    if (!mt.atfork) {
        pthread_atfork(NULL, NULL, mt_child);
        mt.atfork = 1;
    }
    mt.want = n;
    int have = mt.nth;
    while (mt.nth + 1 < n) {
        size_t k = (size_t)mt.nth + 1;
        mt.g0[k] = mt.gen;
        if (pthread_create(&mt.th[k], NULL, mt_worker, (void *)(uintptr_t)k)) break;
        pthread_detach(mt.th[k]);
        mt.nth++;
    }
    if (mt.nth + 1 > n) {               /* fewer: the extra workers leave */
        mt.nth = n - 1;
        pthread_cond_broadcast(&mt.start);
    }
    (void)have;
    int r = mt.nth + 1;
    pthread_mutex_unlock(&mt.mu);
    pthread_mutex_unlock(&mt_call);
    return r;
}

static void mt_run(int kind, uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n) {
    pthread_mutex_lock(&mt.mu);
    size_t parts = (size_t)mt.nth + 1;
    if (n < MT_MIN || parts < 2) parts = 1;
    mt.kind = kind;
    mt.dst = dst;
    mt.a = a;
    mt.b = b;
    mt.n = n;
    mt.parts = parts;
    if (parts > 1) {
        mt.pending = (int)parts - 1;
        __atomic_add_fetch(&mt.gen, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&mt.start);
    }
    pthread_mutex_unlock(&mt.mu);
    run_part(0);
    if (parts > 1) {
        /* the other parts end about now: spin a little before sleeping on the condition */
        for (int i = 0; i < 20000 && __atomic_load_n(&mt.pending, __ATOMIC_ACQUIRE); i++) cpu_relax();
        pthread_mutex_lock(&mt.mu);
        while (mt.pending) pthread_cond_wait(&mt.done, &mt.mu);
        pthread_mutex_unlock(&mt.mu);
    }
}

int gw_pin_span_start(const uint8_t *shadow, const uint8_t *live, size_t n) {
    pthread_mutex_lock(&mt_call);
    pthread_mutex_lock(&mt.mu);
    if (mt.nth < 1 || n < MT_MIN) {
        pthread_mutex_unlock(&mt.mu);
        pthread_mutex_unlock(&mt_call);
        return -1;
    }
    mt.kind = JOB_SPAN;
    mt.dst = NULL;
    mt.a = shadow;
    mt.b = live;
    mt.n = n;
    mt.parts = (size_t)mt.nth;
    mt.shift = 1;
    mt.pending = (int)mt.parts;
    __atomic_add_fetch(&mt.gen, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&mt.start);
    pthread_mutex_unlock(&mt.mu);
    return 0;           /* mt_call stays held until gw_pin_span_finish */
}

int gw_pin_job_done(void) {
    return __atomic_load_n(&mt.pending, __ATOMIC_ACQUIRE) == 0;
}

int gw_pin_span_finish(size_t n, size_t *lo, size_t *hi) {
    for (int i = 0; i < 20000 && __atomic_load_n(&mt.pending, __ATOMIC_ACQUIRE); i++) cpu_relax();
    pthread_mutex_lock(&mt.mu);
    while (mt.pending) pthread_cond_wait(&mt.done, &mt.mu);
    mt.shift = 0;
    pthread_mutex_unlock(&mt.mu);
    int r = mt_span_result(n, lo, hi);
    pthread_mutex_unlock(&mt_call);
    return r;
}

void gw_pin_spin(uint64_t spin_ns) {
    pthread_mutex_lock(&mt.mu);
    mt.spin_ns = spin_ns;
    pthread_mutex_unlock(&mt.mu);
}

void gw_pin_arm(uint64_t ns) {
    pthread_mutex_lock(&mt.mu);
    if (mt.nth > 0 && ns) {
        uint64_t until = now_ns() + ns;
        if (until > mt.spin_until) mt.spin_until = until;
        pthread_cond_broadcast(&mt.start);     /* sleeping workers wake and spin until a job comes */
    }
    pthread_mutex_unlock(&mt.mu);
}


int gw_pin_span_mt(const uint8_t *shadow, const uint8_t *live, size_t n, size_t *lo, size_t *hi) {
    pthread_mutex_lock(&mt_call);
    mt_run(JOB_SPAN, NULL, shadow, live, n);
    int r = mt_span_result(n, lo, hi);
    pthread_mutex_unlock(&mt_call);
    return r;
}

void gw_pin_copy_mt(uint8_t *dst, const uint8_t *src, size_t n) {
    if (n < MT_MIN) {
        memcpy(dst, src, n);
        return;
    }
    pthread_mutex_lock(&mt_call);
    mt_run(JOB_COPY, dst, src, NULL, n);
    pthread_mutex_unlock(&mt_call);
}

int gw_pin_diff_mt(uint8_t *shadow, const uint8_t *live, size_t n, size_t *lo, size_t *hi) {
    if (n < MT_MIN) return gw_pin_diff(shadow, live, n, lo, hi);
    if (!gw_pin_span_mt(shadow, live, n, lo, hi)) return 0;
    gw_pin_copy_mt(shadow + *lo, live + *lo, *hi - *lo);
    return 1;
}

int gw_pin_lock(void *p, size_t n) {
    return mlock(p, n) ? errno : 0;
}

int gw_pin_unlock(void *p, size_t n) {
    return munlock(p, n) ? errno : 0;
}

/* ---------------------------------------------------------------- protect tracking */
#define WP_MAX 4096

#define WP_WORDS 16                     /* granule bitmap words per slot (1024 granules) */

typedef struct {
    _Atomic uint64_t start;     /* 0: free slot */
    _Atomic uint64_t end;
    _Atomic int prot;           /* 1 while write-protected (whole, or all but the dirty granules) */
    _Atomic int dirty;
    _Atomic int uf;             /* protected through the userfaultfd (else mprotect) */
    _Atomic uint64_t gran;      /* 0: a write unprotects the whole region; else granule bytes */
    _Atomic int nfault;         /* faults since the last protect/take (granule mode) */
    _Atomic uint64_t bits[WP_WORDS];  /* granules written (and unprotected) since then */
} wp_slot_t;

static wp_slot_t wp[WP_MAX];
static _Atomic int wp_hi;                /* slots in use are below this */
static _Atomic uint64_t wp_nfaults;
static struct sigaction wp_old;
static _Atomic int wp_installed;
/* the userfaultfd backend (see below): 1 when usable; protect/unprotect a range through it */
static int wps_ready(void);
static int wps_wp(uint64_t start, uint64_t len, int on);
static int wps_register(uint64_t start, uint64_t len, int on);

static void wp_chain(int sig, siginfo_t *si, void *ctx) {
    if (wp_old.sa_flags & SA_SIGINFO) {
        if (wp_old.sa_sigaction) {
            wp_old.sa_sigaction(sig, si, ctx);
            return;
        }
    } else if (wp_old.sa_handler == SIG_IGN) {
        return;
    } else if (wp_old.sa_handler != SIG_DFL && wp_old.sa_handler) {
        wp_old.sa_handler(sig);
        return;
    }
    /* default action: restore it and return; the faulting instruction faults again */
    signal(sig, SIG_DFL);
}

/* A write fault at a in slot i: what becomes writable. Granule mode: the first fault since
 * the last protect/take marks its granule written and unprotects that granule only; a second
 * one (a writer of more than one granule: most likely the whole region) unprotects the whole
 * region. The marks are set before the range becomes writable, so no write goes unrecorded.
 * Async-signal-safe (atomics only). Returns the range to make writable in *us, *ue. */
static void wp_fault_range(int i, uint64_t a, uint64_t *us, uint64_t *ue) {
    uint64_t s = atomic_load(&wp[i].start), e = atomic_load(&wp[i].end);
    uint64_t g = atomic_load(&wp[i].gran);
    if (g && atomic_fetch_add(&wp[i].nfault, 1) == 0) {
        uint64_t k = (a - s) / g;
        atomic_fetch_or(&wp[i].bits[k / 64], (uint64_t)1 << (k % 64));
        atomic_store(&wp[i].dirty, 1);
        *us = s + k * g;
        *ue = *us + g < e ? *us + g : e;
        return;
    }
    atomic_store(&wp[i].dirty, 1);
    atomic_store(&wp[i].prot, 0);
    *us = s;
    *ue = e;
}

static void wp_handler(int sig, siginfo_t *si, void *ctx) {
    if (si && si->si_code == SEGV_ACCERR) {
        uint64_t a = (uint64_t)(uintptr_t)si->si_addr;
        int hi = atomic_load(&wp_hi);
        for (int i = 0; i < hi; i++) {
            uint64_t s = atomic_load(&wp[i].start), e = atomic_load(&wp[i].end);
            if (s && a >= s && a < e) {
                int saved = errno;
                uint64_t us, ue;
                wp_fault_range(i, a, &us, &ue);
                mprotect((void *)(uintptr_t)us, ue - us, PROT_READ | PROT_WRITE);
                atomic_fetch_add(&wp_nfaults, 1);
                errno = saved;
                return;      /* the store runs again, now allowed */
            }
        }
    }
    wp_chain(sig, si, ctx);
}

static int wp_install(void) {
    if (atomic_load(&wp_installed)) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = wp_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &wp_old)) return -errno;
    atomic_store(&wp_installed, 1);
    return 0;
}

/* granule mode's marks: none written since now */
static void wp_clear_marks(int slot) {
    atomic_store(&wp[slot].nfault, 0);
    for (int w = 0; w < WP_WORDS; w++) atomic_store(&wp[slot].bits[w], 0);
}

int gw_wp_add(uint64_t start, uint64_t len) {
    if (!start || !len) return -EINVAL;
    int uf = wps_ready() && wps_register(start, len, 1) == 0;
    if (!uf) {
        int e = wp_install();
        if (e) return e;
    }
    for (int i = 0; i < WP_MAX; i++) {
        uint64_t z = 0;
        if (atomic_load(&wp[i].start) == 0) {
            atomic_store(&wp[i].end, start + len);
            atomic_store(&wp[i].prot, 0);
            atomic_store(&wp[i].dirty, 1);
            atomic_store(&wp[i].uf, uf);
            atomic_store(&wp[i].gran, 0);
            wp_clear_marks(i);
            if (!atomic_compare_exchange_strong(&wp[i].start, &z, start)) continue;
            int hi = atomic_load(&wp_hi);
            while (hi <= i && !atomic_compare_exchange_weak(&wp_hi, &hi, i + 1)) {}
            return i;
        }
    }
    if (uf) wps_register(start, len, 0);
    return -1;
}

static int wp_ok(int slot) {
    return slot >= 0 && slot < WP_MAX && atomic_load(&wp[slot].start) != 0;
}

/* write-protect (on) or unprotect [s, e) of a slot through its backend: 0 or an errno */
static int wp_range(int slot, uint64_t s, uint64_t e, int on) {
    if (atomic_load(&wp[slot].uf)) return wps_wp(s, e - s, on);
    return mprotect((void *)(uintptr_t)s, e - s, on ? PROT_READ : PROT_READ | PROT_WRITE) ? errno : 0;
}

int gw_wp_unprotect(int slot) {
    if (!wp_ok(slot)) return EINVAL;
    atomic_store(&wp[slot].prot, 0);
    return wp_range(slot, atomic_load(&wp[slot].start), atomic_load(&wp[slot].end), 0);
}

void gw_wp_remove(int slot) {
    if (!wp_ok(slot)) return;
    gw_wp_unprotect(slot);
    if (atomic_load(&wp[slot].uf)) {
        uint64_t s = atomic_load(&wp[slot].start), e = atomic_load(&wp[slot].end);
        wps_register(s, e - s, 0);          /* (wakes any fault still pending there) */
    }
    atomic_store(&wp[slot].start, 0);
}

int gw_wp_set_granule(int slot, uint64_t gran) {
    if (!wp_ok(slot)) return EINVAL;
    uint64_t s = atomic_load(&wp[slot].start), e = atomic_load(&wp[slot].end);
    long pg = sysconf(_SC_PAGESIZE);
    if (gran && (gran % (uint64_t)pg || (e - s + gran - 1) / gran > 64 * WP_WORDS)) return ERANGE;
    atomic_store(&wp[slot].gran, gran);
    return 0;
}

int gw_wp_take(int slot, uint64_t *runs, int cap) {
    if (!wp_ok(slot)) return -1;
    if (!atomic_load(&wp[slot].prot)) return -1;       /* unprotected whole: push it whole */
    if (!atomic_load(&wp[slot].dirty)) return 0;
    uint64_t g = atomic_load(&wp[slot].gran);
    if (!g) return -1;
    uint64_t s = atomic_load(&wp[slot].start), e = atomic_load(&wp[slot].end);
    /* cleared before the marks are read: a fault from here on sets them again (next take) */
    atomic_store(&wp[slot].dirty, 0);
    atomic_store(&wp[slot].nfault, 0);
    int n = 0, over = 0;
    uint64_t lo = 0, hi = 0;
    for (int w = 0; w < WP_WORDS; w++) {
        uint64_t m = atomic_exchange(&wp[slot].bits[w], 0);
        while (m) {
            int b = __builtin_ctzll(m);
            m &= m - 1;
            uint64_t a0 = s + ((uint64_t)w * 64 + (uint64_t)b) * g, a1 = a0 + g < e ? a0 + g : e;
            /* protected again before the caller copies it: a later store is caught */
            if (wp_range(slot, a0, a1, 1)) over = 1;
            if (n && a0 == hi) {
                hi = a1;
                continue;
            }
            if (n) {
                if (n <= cap) { runs[2 * (n - 1)] = lo - s; runs[2 * (n - 1) + 1] = hi - s; }
            }
            lo = a0;
            hi = a1;
            n++;
        }
    }
    if (n && n <= cap) {
        runs[2 * (n - 1)] = lo - s;
        runs[2 * (n - 1) + 1] = hi - s;
    }
    if (over || n > cap) {          /* (cannot re-protect, or too many runs): whole */
        atomic_store(&wp[slot].dirty, 1);
        atomic_store(&wp[slot].prot, 0);
        return -1;
    }
    return n;
}

int gw_wp_protect(int slot) {
    if (!wp_ok(slot)) return EINVAL;
    uint64_t s = atomic_load(&wp[slot].start), e = atomic_load(&wp[slot].end);
    atomic_store(&wp[slot].dirty, 0);
    wp_clear_marks(slot);
    atomic_store(&wp[slot].prot, 1);
    int err = wp_range(slot, s, e, 1);
    if (err) {
        atomic_store(&wp[slot].prot, 0);
        atomic_store(&wp[slot].dirty, 1);
        return err;
    }
    return 0;
}

int gw_wp_dirty(int slot) {
    if (!wp_ok(slot)) return 1;
    return atomic_load(&wp[slot].dirty) || !atomic_load(&wp[slot].prot);
}

uint64_t gw_wp_faults(void) { return atomic_load(&wp_nfaults); }

/* ---------------------------------------------------------------- written tracking */
/* (the ABI of Linux >= 6.7, defined here when the build machine's headers are older) */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start, end, categories;
};
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WRITTEN (1 << 1)
#endif

static int uf_fd = -1, uf_pm = -1;
/* set in a forked child: the userfaultfd still names the parent's address space, so every
 * later call refuses (ENODEV) instead of protecting the parent's pages */
static volatile int uf_forked;
static void uf_atfork_child(void) { uf_forked = 1; }
static int uf_state = -1;                 /* -1: not probed; else gw_uf_init's result */
static pthread_mutex_t uf_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic uint64_t uf_nscans;

static long uf_scan_raw(uint64_t start, uint64_t end, int rewp, struct page_region *v, long nv,
                        uint64_t *walk_end) {
    struct pm_scan_arg a;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.flags = PM_SCAN_CHECK_WPASYNC | (rewp ? PM_SCAN_WP_MATCHING : 0);
    a.start = start;
    a.end = end;
    a.vec = (uint64_t)(uintptr_t)v;
    a.vec_len = (uint64_t)nv;
    a.category_mask = PAGE_IS_WRITTEN;
    a.return_mask = PAGE_IS_WRITTEN;
    long n = ioctl(uf_pm, PAGEMAP_SCAN, &a);
    atomic_fetch_add(&uf_nscans, 1);
    if (n < 0) return -errno;
    *walk_end = a.walk_end;
    return n;
}

static int uf_probe(void) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && (errno == EPERM || errno == EACCES))
        /* unprivileged (vm.unprivileged_userfaultfd = 0): user-mode faults only. Asynchronous
         * write-protect faults never reach the userfaultfd, so kernel writes still work. */
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0) return errno ? errno : ENOSYS;
    struct uffdio_api api;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    if (ioctl(fd, UFFDIO_API, &api) ||
        (api.features & (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)) !=
            (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)) {
        close(fd);
        return EOPNOTSUPP;
    }
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) {
        int e = errno;
        close(fd);
        return e == ENOENT ? EOPNOTSUPP : e;
    }
    uf_fd = fd;
    uf_pm = pm;
    /* end to end on two scratch pages: protect, write one, the scan must name that one only;
     * a write through a system call (kernel mode) must work and be recorded too */
    long pg = sysconf(_SC_PAGESIZE);
    uint8_t *p = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int rc = 0;
    if (p == MAP_FAILED) {
        rc = ENOMEM;
    } else {
        uint64_t s = (uint64_t)(uintptr_t)p, out[4];
        memset(p, 1, 2 * pg);
        int pfd[2] = {-1, -1};
        if (gw_uf_register(s, 2 * pg) || gw_uf_protect(s, 2 * pg, 1)) {
            rc = EOPNOTSUPP;
        } else if (gw_uf_scan(s, 2 * pg, 1, out, 2) != 0) {
            rc = EOPNOTSUPP;            /* nothing was written yet */
        } else {
            p[pg + 5] = 2;
            if (gw_uf_scan(s, 2 * pg, 1, out, 2) != 1 || out[0] != s + pg || out[1] != s + 2 * pg)
                rc = EOPNOTSUPP;
            else if (pipe(pfd) == 0) {
                uint8_t b = 3;
                if (write(pfd[1], &b, 1) != 1 || read(pfd[0], p, 1) != 1 || p[0] != 3 ||
                    gw_uf_scan(s, 2 * pg, 1, out, 2) != 1 || out[0] != s || out[1] != s + pg)
                    rc = EOPNOTSUPP;
            } else {
                rc = errno;
            }
        }
        if (pfd[0] >= 0) close(pfd[0]);
        if (pfd[1] >= 0) close(pfd[1]);
        gw_uf_unregister(s, 2 * pg);
        munmap(p, 2 * pg);
    }
    if (rc) {
        close(uf_fd);
        close(uf_pm);
        uf_fd = uf_pm = -1;
    }
    return rc;
}

int gw_uf_init(void) {
    pthread_mutex_lock(&uf_mu);
    if (uf_forked) {
        pthread_mutex_unlock(&uf_mu);
        return ENODEV;
    }
    if (uf_state < 0) {
        uf_state = 0;                   /* (the probe's own calls need the descriptors) */
        uf_state = uf_probe();
        if (uf_state == 0) pthread_atfork(NULL, NULL, uf_atfork_child);
    }
    int r = uf_state;
    pthread_mutex_unlock(&uf_mu);
    return r;
}

/* the three userfaultfd range operations, for both userfaultfds (this one and 'protect''s) */
static int uffd_register_fd(int fd, uint64_t start, uint64_t len) {
    struct uffdio_register r;
    memset(&r, 0, sizeof r);
    r.range.start = start;
    r.range.len = len;
    r.mode = UFFDIO_REGISTER_MODE_WP;
    return ioctl(fd, UFFDIO_REGISTER, &r) ? errno : 0;
}

static int uffd_wp_fd(int fd, uint64_t start, uint64_t len, int on) {
    struct uffdio_writeprotect w;
    memset(&w, 0, sizeof w);
    w.range.start = start;
    w.range.len = len;
    w.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) ? errno : 0;
}

static int uffd_unregister_fd(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range r = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_UNREGISTER, &r) ? errno : 0;
}

int gw_uf_register(uint64_t start, uint64_t len) {
    if (uf_fd < 0 || uf_forked) return ENODEV;
    return uffd_register_fd(uf_fd, start, len);
}

int gw_uf_protect(uint64_t start, uint64_t len, int on) {
    if (uf_fd < 0 || uf_forked) return ENODEV;
    return uffd_wp_fd(uf_fd, start, len, on);
}

int gw_uf_unregister(uint64_t start, uint64_t len) {
    if (uf_fd < 0 || uf_forked) return ENODEV;
    gw_uf_protect(start, len, 0);
    return uffd_unregister_fd(uf_fd, start, len);
}

long gw_uf_scan(uint64_t start, uint64_t len, int rewp, uint64_t *out, long max) {
    if (uf_pm < 0 || uf_forked) return -ENODEV;
    if (max < 1) return -EINVAL;
    struct page_region v[32];
    uint64_t at = start, end = start + len;
    long k = 0;
    while (at < end) {
        uint64_t we = end;
        long n = uf_scan_raw(at, end, rewp, v, 32, &we);
        if (n < 0) return n;
        for (long i = 0; i < n; i++) {
            if (k > 0 && (k == max || v[i].start == out[2 * k - 1])) {
                out[2 * k - 1] = v[i].end;          /* merged into the last one */
            } else {
                out[2 * k] = v[i].start;
                out[2 * k + 1] = v[i].end;
                k++;
            }
        }
        if (n < 32 || we <= at) break;              /* walked to the end */
        at = we;
    }
    return k;
}

uint64_t gw_uf_scans(void) { return atomic_load(&uf_nscans); }

/* ---------------------------------------------------------------- protect through a userfaultfd */
/* 'protect' without its EFAULT caveat: where this process may handle kernel-mode faults (root,
 * CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd = 1), the regions are write-protected through
 * a second userfaultfd in synchronous mode. A store into a protected page (also by a system
 * call) waits for the handler thread below, which marks the region dirty and unprotects the
 * whole region (waking the writer): one fault per region per protect cycle, as with the
 * SIGSEGV handler, but read(2) into the region works. Else the mprotect backend is used. */
static int wps_fd = -1;
static int wps_kick = -1;              /* eventfd: wakes the handler so it starts spinning */
static _Atomic uint64_t wps_spin_until; /* CLOCK_MONOTONIC ns: the handler polls without sleeping */
static _Atomic int wps_sleeping;       /* the handler is (about to be) in poll(2) */
static int wps_state = -1;             /* -1: not probed; 0: usable; > 0: errno (mprotect) */
static volatile int wps_forked;
static _Atomic uint64_t wps_unknown;   /* faults outside every slot (unprotected page by page) */
static pthread_mutex_t wps_mu = PTHREAD_MUTEX_INITIALIZER;
static void wps_atfork_child(void) { wps_forked = 1; }

static int wps_wp(uint64_t start, uint64_t len, int on) {
    if (wps_fd < 0 || wps_forked) return ENODEV;
    return uffd_wp_fd(wps_fd, start, len, on);
}

static int wps_register(uint64_t start, uint64_t len, int on) {
    if (wps_fd < 0 || wps_forked) return ENODEV;
    return on ? uffd_register_fd(wps_fd, start, len) : uffd_unregister_fd(wps_fd, start, len);
}

static void *wps_loop(void *arg) {
    int fd = (int)(intptr_t)arg;
    long pg = sysconf(_SC_PAGESIZE);
    for (;;) {
        struct uffd_msg m;
        ssize_t n;
        if (now_ns() < atomic_load(&wps_spin_until)) {
            /* spinning (gw_wp_spin): a fault is taken without the handler's wake-up */
            n = read(fd, &m, sizeof m);
            if (n < 0 && errno == EAGAIN) {
                cpu_relax();
                continue;
            }
        } else {
            atomic_store(&wps_sleeping, 1);
            if (now_ns() < atomic_load(&wps_spin_until)) {  /* (a spin asked for meanwhile) */
                atomic_store(&wps_sleeping, 0);
                continue;
            }
            struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = wps_kick, .events = POLLIN}};
            int r = poll(p, wps_kick >= 0 ? 2 : 1, -1);
            atomic_store(&wps_sleeping, 0);
            if (r < 0) {
                if (errno == EINTR) continue;
                break;
            }
            if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) break;
            if (wps_kick >= 0 && (p[1].revents & POLLIN)) {
                uint64_t v;
                if (read(wps_kick, &v, sizeof v) < 0) { /* (drained) */ }
            }
            if (!(p[0].revents & POLLIN)) continue;
            n = read(fd, &m, sizeof m);
        }
        if (n != (ssize_t)sizeof m) {
            if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            break;
        }
        if (m.event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t a = m.arg.pagefault.address;
        int hi = atomic_load(&wp_hi), done = 0;
        atomic_fetch_add(&wp_nfaults, 1);  /* (counted and flagged before the writer wakes) */
        for (int i = 0; i < hi && !done; i++) {
            uint64_t s = atomic_load(&wp[i].start), e = atomic_load(&wp[i].end);
            if (s && a >= s && a < e && atomic_load(&wp[i].uf)) {
                uint64_t us, ue;
                wp_fault_range(i, a, &us, &ue);
                done = uffd_wp_fd(fd, us, ue - us, 0) == 0;   /* (wakes the writer) */
            }
        }
        if (!done) {                   /* (a region being removed, the probe): this page only */
            uint64_t p0 = a & ~(uint64_t)(pg - 1);
            atomic_fetch_add(&wps_unknown, 1);
            if (uffd_wp_fd(fd, p0, pg, 0)) {
                struct uffdio_range wr = {.start = p0, .len = pg};
                ioctl(fd, UFFDIO_WAKE, &wr);
            }
        }
    }
    return NULL;
}

typedef struct {
    uint8_t *p;
    int pipefd;                        /* >= 0: read one byte from it into p (a kernel write) */
    int ok;
} wps_probe_t;

static void *wps_probe_write(void *arg) {
    wps_probe_t *t = arg;
    if (t->pipefd >= 0)
        t->ok = read(t->pipefd, t->p + 1, 1) == 1;
    else {
        t->p[0] = 7;
        t->ok = 1;
    }
    return NULL;
}

/* a write from another thread into a protected scratch page must be resolved by the handler
 * within a second: 0 or an errno (the page is unregistered then, which wakes the writer) */
static int wps_probe_one(uint8_t *p, long pg, int pipefd) {
    if (uffd_wp_fd(wps_fd, (uint64_t)(uintptr_t)p, pg, 1)) return EOPNOTSUPP;
    uint64_t before = atomic_load(&wps_unknown);
    wps_probe_t t = {.p = p, .pipefd = pipefd, .ok = 0};
    pthread_t th;
    if (pthread_create(&th, NULL, wps_probe_write, &t)) return EAGAIN;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 1;
    if (pthread_timedjoin_np(th, NULL, &dl)) {
        uffd_unregister_fd(wps_fd, (uint64_t)(uintptr_t)p, (uint64_t)pg);
        pthread_join(th, NULL);
        return ETIMEDOUT;
    }
    return (t.ok && atomic_load(&wps_unknown) > before) ? 0 : EOPNOTSUPP;
}

static int wps_probe(void) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);  /* kernel faults too */
    if (fd < 0) return errno ? errno : ENOSYS;
    struct uffdio_api api;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_WP_UNPOPULATED;    /* untouched pages are protected too */
    if (ioctl(fd, UFFDIO_API, &api) || !(api.features & UFFD_FEATURE_WP_UNPOPULATED)) {
        close(fd);
        return EOPNOTSUPP;
    }
    pthread_t th;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 64 << 10);
    wps_kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);   /* (-1: no spinning, the rest works) */
    int e = pthread_create(&th, &at, wps_loop, (void *)(intptr_t)fd);
    pthread_attr_destroy(&at);
    if (e) {
        close(fd);
        return e;
    }
    wps_fd = fd;                        /* (the handler keeps running: it owns fd from now on) */
    long pg = sysconf(_SC_PAGESIZE);
    uint8_t *p = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return ENOMEM;
    memset(p, 1, pg);
    int rc = wps_register((uint64_t)(uintptr_t)p, pg, 1) ? EOPNOTSUPP : 0;
    int pfd[2] = {-1, -1};
    if (!rc) rc = wps_probe_one(p, pg, -1);                  /* a store */
    if (!rc && pipe(pfd)) rc = errno;
    if (!rc) {
        uint8_t b = 9;
        rc = write(pfd[1], &b, 1) == 1 ? wps_probe_one(p, pg, pfd[0]) : EIO;   /* read(2) into it */
        if (!rc && (p[0] != 7 || p[1] != 9)) rc = EOPNOTSUPP;
    }
    if (pfd[0] >= 0) close(pfd[0]);
    if (pfd[1] >= 0) close(pfd[1]);
    if (rc != ETIMEDOUT) wps_register((uint64_t)(uintptr_t)p, pg, 0);
    munmap(p, pg);
    if (rc) wps_fd = -1;                /* (the handler thread idles on its descriptor) */
    return rc;
}

static int wps_want = 1;

int gw_wp_use_uffd(int on) {
    pthread_mutex_lock(&wps_mu);
    if (wps_state < 0) wps_want = on;
    int r = wps_state < 0 ? 0 : -1;
    pthread_mutex_unlock(&wps_mu);
    return r;
}

static int wps_ready(void) {
    pthread_mutex_lock(&wps_mu);
    if (wps_state < 0 && !wps_forked) {
        if (!wps_want) {
            wps_state = EPERM;
        } else {
            wps_state = wps_probe();
            if (wps_state == 0) pthread_atfork(NULL, NULL, wps_atfork_child);
        }
    }
    int ok = wps_state == 0 && !wps_forked;
    pthread_mutex_unlock(&wps_mu);
    return ok;
}

int gw_wp_backend(void) { return wps_ready() ? 1 : 0; }

void gw_wp_spin(uint64_t ns) {
    if (wps_fd < 0 || wps_forked || wps_kick < 0 || !ns) return;
    uint64_t until = now_ns() + ns, cur = atomic_load(&wps_spin_until);
    while (cur < until && !atomic_compare_exchange_weak(&wps_spin_until, &cur, until)) {}
    if (atomic_load(&wps_sleeping)) {
        uint64_t one = 1;
        if (write(wps_kick, &one, sizeof one) < 0) { /* (full: it is awake anyway) */ }
    }
}
