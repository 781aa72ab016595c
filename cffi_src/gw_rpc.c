/* gpuwire RPC hot paths (see gw_rpc.h). */
#include "gw_rpc.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gpuwire's wire format is little-endian; this code reads it in place"
#endif

uint32_t gw_rpc_abi(void) { return GW_RPC_ABI; }

static void errf(char *err, size_t errlen, const char *fmt, ...) {
  if (!err || !errlen) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static inline uint64_t rd64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}
static inline uint32_t rd32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
static inline uint16_t rd16(const uint8_t *p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}

/* ------------------------------------------------------------------ encoder */

int64_t gw_rpc_put(uint8_t *buf, size_t cap, size_t pos, uint16_t id, uint32_t len, const char *codes,
                   int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t a4, int64_t a5, int64_t a6,
                   int64_t a7, int64_t a8, int64_t a9) {
  int64_t a[10] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9};
  size_t need = 8;
  int n = 0;
  for (const char *c = codes; *c; c++, n++) {
    switch (*c) {
      case 'b': case 'B': need += 1; break;
      case 'h': case 'H': need += 2; break;
      case 'i': case 'I': need += 4; break;
      case 'q': case 'Q': need += 8; break;
      default: return -3;
    }
  }
  if (n > 10) return -3;
  if (pos + need > cap) return -1;
  uint8_t *p = buf + pos;
  memcpy(p, &id, 2);
  uint16_t zero = 0;
  memcpy(p + 2, &zero, 2);
  memcpy(p + 4, &len, 4);
  p += 8;
  for (int i = 0; i < n; i++) {
    int64_t v = a[i];
    switch (codes[i]) {
      case 'b': { if (v < -128 || v > 127) return -2; int8_t x = (int8_t)v; memcpy(p, &x, 1); p += 1; break; }
      case 'B': { if (v < 0 || v > 255) return -2; uint8_t x = (uint8_t)v; memcpy(p, &x, 1); p += 1; break; }
      case 'h': { if (v < -32768 || v > 32767) return -2; int16_t x = (int16_t)v; memcpy(p, &x, 2); p += 2; break; }
      case 'H': { if (v < 0 || v > 65535) return -2; uint16_t x = (uint16_t)v; memcpy(p, &x, 2); p += 2; break; }
      case 'i': { if (v < INT32_MIN || v > INT32_MAX) return -2; int32_t x = (int32_t)v; memcpy(p, &x, 4); p += 4; break; }
      case 'I': { if (v < 0 || v > (int64_t)UINT32_MAX) return -2; uint32_t x = (uint32_t)v; memcpy(p, &x, 4); p += 4; break; }
      case 'q': { memcpy(p, &v, 8); p += 8; break; }
      case 'Q': { if (v < 0) return -2; memcpy(p, &v, 8); p += 8; break; }
    }
  }
  return (int64_t)(p - buf);
}

/* ------------------------------------------------------------------ decoder */

int gw_rpc_scan(const uint8_t *frame, size_t off, size_t end, uint32_t ncalls, int sync,
                const gw_rpc_desc_t *desc, uint32_t ndesc, gw_rpc_rec_t *out, char *err, size_t errlen) {
  for (uint32_t i = 0; i < ncalls; i++) {
    if (end - off < 8 || off > end) {
      errf(err, errlen, "call %u: record header runs past the frame end", i);
      return GW_RPC_ST_TRUNCATED;
    }
    uint16_t id = rd16(frame + off);
    uint16_t rflags = rd16(frame + off + 2);
    uint32_t len = rd32(frame + off + 4);
    if (id >= ndesc || !desc[id].valid) {
      errf(err, errlen, "call %u: unknown call id %u", i, (unsigned)id);
      return GW_RPC_ST_UNKNOWN_CALL;
    }
    const gw_rpc_desc_t *d = &desc[id];
    if (rflags) {
      errf(err, errlen, "call %u (id %u): unknown record flags 0x%x", i, (unsigned)id, (unsigned)rflags);
      return GW_RPC_ST_MALFORMED;
    }
    size_t rend = off + (size_t)len;
    if ((size_t)len < 8u + d->fixed || rend > end) {
      errf(err, errlen, "call %u (id %u): record length %u does not fit (fixed part %u B, %zu B left)", i,
           (unsigned)id, (unsigned)len, (unsigned)d->fixed, end - off);
      return rend > end ? GW_RPC_ST_TRUNCATED : GW_RPC_ST_MALFORMED;
    }
    if (!d->deferred && (!sync || i != ncalls - 1)) {
      errf(err, errlen, "call %u (id %u) is sync but not the last call of a sync frame", i, (unsigned)id);
      return GW_RPC_ST_MALFORMED;
    }
    if (d->nvar > GW_RPC_MAXVAR || d->nroute > GW_RPC_MAXVAR) {
      errf(err, errlen, "call id %u: too many blobs for the C decoder", (unsigned)id);
      return GW_RPC_ST_MALFORMED;
    }
    gw_rpc_rec_t *r = &out[i];
    r->id = id;
    r->nvar = d->nvar;
    r->nroute = d->nroute;
    r->pad = 0;
    r->fixed = (uint32_t)(off + 8);
    size_t p = off + 8 + d->fixed;
    for (int k = 0; k < d->nvar; k++) {
      if (rend - p < 4) {
        errf(err, errlen, "call %u (id %u): blob %d header missing", i, (unsigned)id, k);
        return GW_RPC_ST_MALFORMED;
      }
      uint32_t bn = rd32(frame + p);
      if (bn == 0xFFFFFFFFu) {
        if (rend - p < 16) {
          errf(err, errlen, "call %u (id %u): bulk slot truncated", i, (unsigned)id);
          return GW_RPC_ST_MALFORMED;
        }
        uint32_t tag = rd32(frame + p + 4);
        if (tag < GW_RPC_TAG_IN_FIRST || tag > GW_RPC_TAG_IN_LAST) {
          errf(err, errlen, "call %u (id %u): bulk tag 0x%x outside the client->server bulk range", i,
               (unsigned)id, tag);
          return GW_RPC_ST_MALFORMED;
        }
        r->var_off[k] = 0xFFFFFFFFu;
        r->var_len[k] = tag;
        r->var_bulk[k] = rd64(frame + p + 8);
        p += 16;
      } else {
        if (rend - p - 4 < bn) {
          errf(err, errlen, "call %u (id %u): blob %d of %u B runs past its record", i, (unsigned)id, k, bn);
          return GW_RPC_ST_MALFORMED;
        }
        r->var_off[k] = (uint32_t)(p + 4);
        r->var_len[k] = bn;
        r->var_bulk[k] = 0;
        p += 4 + (size_t)bn;
      }
    }
    for (int k = 0; k < d->nroute; k++) {
      if (rend - p < 4) {
        errf(err, errlen, "call %u (id %u): route %d missing", i, (unsigned)id, k);
        return GW_RPC_ST_MALFORMED;
      }
      uint32_t rt = rd32(frame + p);
      if (rt == GW_RPC_ROUTE_REPLY) {
        if (!d->deferred || !sync) {
          errf(err, errlen, "call %u (id %u): route %d to the reply tail outside a sync frame's deferred call",
               i, (unsigned)id, k);
          return GW_RPC_ST_MALFORMED;
        }
      } else if (rt && (rt < GW_RPC_TAG_OUT_FIRST || rt > GW_RPC_TAG_OUT_LAST)) {
        errf(err, errlen, "call %u (id %u): route tag 0x%x outside the server->client bulk range", i,
             (unsigned)id, rt);
        return GW_RPC_ST_MALFORMED;
      }
      if (d->deferred && !rt) {
        errf(err, errlen, "call %u (id %u): a deferred out buffer needs a bulk route", i, (unsigned)id);
        return GW_RPC_ST_MALFORMED;
      }
      r->route[k] = rt;
      p += 4;
    }
    if (p != rend) {
      errf(err, errlen, "call %u (id %u): %zu stray bytes at the end of the record", i, (unsigned)id, rend - p);
      return GW_RPC_ST_MALFORMED;
    }
    r->end = (uint32_t)rend;
    off = rend;
  }
  if (off != end) {
    errf(err, errlen, "%zu bytes after the last of %u calls", end - off, ncalls);
    return GW_RPC_ST_MALFORMED;
  }
  return 0;
}

/* ------------------------------------------------------------------ handle tables */

typedef struct {
  uint64_t *keys;
  uint64_t *vals;
  uint32_t *aux;
  uint8_t *state; /* 0 empty, 1 full, 2 deleted */
  size_t cap, n, used;
} htab_t;

static inline size_t hslot(uint64_t k, size_t cap) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return (size_t)k & (cap - 1);
}

static int htab_grow(htab_t *t, size_t ncap) {
  htab_t o = *t;
  t->keys = calloc(ncap, sizeof(uint64_t));
  t->vals = calloc(ncap, sizeof(uint64_t));
  t->aux = calloc(ncap, sizeof(uint32_t));
  t->state = calloc(ncap, 1);
  if (!t->keys || !t->vals || !t->aux || !t->state) {
    free(t->keys); free(t->vals); free(t->aux); free(t->state);
    *t = o;
    return -1;
  }
  t->cap = ncap;
  t->n = t->used = 0;
  for (size_t i = 0; i < o.cap; i++) {
    if (o.state[i] != 1) continue;
    size_t j = hslot(o.keys[i], ncap);
    while (t->state[j]) j = (j + 1) & (ncap - 1);
    t->keys[j] = o.keys[i];
    t->vals[j] = o.vals[i];
    t->aux[j] = o.aux[i];
    t->state[j] = 1;
    t->n++;
    t->used++;
  }
  free(o.keys); free(o.vals); free(o.aux); free(o.state);
  return 0;
}

static long htab_find(const htab_t *t, uint64_t k) {
  if (!t->cap) return -1;
  size_t j = hslot(k, t->cap);
  for (size_t probes = 0; probes < t->cap; probes++) {
    if (t->state[j] == 0) return -1;
    if (t->state[j] == 1 && t->keys[j] == k) return (long)j;
    j = (j + 1) & (t->cap - 1);
  }
  return -1;
}

static int htab_put(htab_t *t, uint64_t k, uint64_t v, uint32_t aux) {
  long f = htab_find(t, k);
  if (f >= 0) {
    t->vals[f] = v;
    t->aux[f] = aux;
    return 0;
  }
  if ((t->used + 1) * 2 > t->cap) {
    size_t ncap = t->cap ? t->cap : 64;
    while ((t->n + 1) * 4 > ncap) ncap *= 2; /* rehash drops tombstones; grow past 25% live */
    if (htab_grow(t, ncap)) return -1;
  }
  size_t j = hslot(k, t->cap);
  while (t->state[j] == 1) j = (j + 1) & (t->cap - 1);
  if (t->state[j] == 0) t->used++;
  t->keys[j] = k;
  t->vals[j] = v;
  t->aux[j] = aux;
  t->state[j] = 1;
  t->n++;
  return 0;
}

static int htab_del(htab_t *t, uint64_t k) {
  long f = htab_find(t, k);
  if (f < 0) return -1;
  t->state[f] = 2;
  t->n--;
  return 0;
}

static void htab_free(htab_t *t) {
  free(t->keys); free(t->vals); free(t->aux); free(t->state);
  memset(t, 0, sizeof(*t));
}

/* ------------------------------------------------------------------ allocations */

typedef struct {
  uint64_t *start, *size;
  size_t n, cap;
} amap_t;

static size_t amap_upper(const amap_t *m, uint64_t p) { /* first index with start > p */
  size_t lo = 0, hi = m->n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (m->start[mid] <= p) lo = mid + 1; else hi = mid;
  }
  return lo;
}

static int amap_ok(const amap_t *m, uint64_t p, uint64_t n) {
  size_t i = amap_upper(m, p);
  if (i == 0) return 0;
  uint64_t s = m->start[i - 1], sz = m->size[i - 1];
  if (p + n < p) return 0; /* wraps */
  if (p + n > s + sz) return 0;
  if (n == 0 && p >= s + sz) return 0;
  return 1;
}

/* ------------------------------------------------------------------ session */

#define GW_RPC_PARAMS 3 /* function id -> malloc'd parameter offsets (aux: count) */
#define GW_RPC_MAXPARAMS 128

/* a launch's signature in a graphed run: what must match for the run's graph to replay it */
typedef struct {
  uint64_t fid;     /* function (wire id) */
  uint32_t dim[7];  /* grid x y z, block x y z, dynamic shared memory */
  uint32_t plen;    /* parameter bytes */
} gsig_t;

/* a run the session has seen (a graph once it was seen twice) */
typedef struct {
  uint64_t key;     /* hash of the signatures (0: free slot) */
  uint64_t used;    /* LRU tick */
  uint32_t n;       /* launches */
  int failed;       /* its graph failed once: the run goes one by one */
  gsig_t *sig;
  void *graph, *exec;
  void **nodes;
  uint8_t *params;  /* each node's parameter bytes as last set (at poff[k]) */
  uint32_t *poff;
} gent_t;

struct gw_rpc_sess {
  htab_t tab[4];
  amap_t allocs;
  uint16_t ids[GW_RPC_NHOT];
  void *fn[GW_RPC_NHOT];
  int8_t hot_by_id[65536]; /* call id -> hot index, or -1 */
  /* launch-run graphs (gw_rpc_graph_setup) */
  gw_rpc_graph_fns_t g;
  uint32_t g_min, g_cap;
  gent_t *g_ents;
  gsig_t *g_sig;    /* the current run's signatures (grown as runs need; kept) */
  uint32_t g_sig_cap;
  uint64_t g_tick;
  uint64_t g_stat[GW_RPC_GS_N];
};

static void graph_flush(gw_rpc_sess_t *s, int count);

gw_rpc_sess_t *gw_rpc_sess_new(void) {
  gw_rpc_sess_t *s = calloc(1, sizeof(*s));
  if (!s) return NULL;
  memset(s->hot_by_id, -1, sizeof(s->hot_by_id));
  return s;
}

void gw_rpc_sess_free(gw_rpc_sess_t *s) {
  if (!s) return;
  graph_flush(s, 0);
  free(s->g_ents);
  free(s->g_sig);
  htab_t *pt = &s->tab[GW_RPC_PARAMS];
  for (size_t i = 0; i < pt->cap; i++)
    if (pt->state[i] == 1) free((void *)(uintptr_t)pt->vals[i]);
  for (int k = 0; k < 4; k++) htab_free(&s->tab[k]);
  free(s->allocs.start);
  free(s->allocs.size);
  free(s);
}

void gw_rpc_set_call(gw_rpc_sess_t *s, int which, uint16_t call_id, void *fn) {
  if (which < 0 || which >= GW_RPC_NHOT) return;
  if (s->fn[which] && s->hot_by_id[s->ids[which]] == which) s->hot_by_id[s->ids[which]] = -1;
  s->ids[which] = call_id;
  s->fn[which] = fn;
  if (fn) s->hot_by_id[call_id] = (int8_t)which;
}

int gw_rpc_bind(gw_rpc_sess_t *s, int kind, uint64_t id, uint64_t handle, uint32_t aux) {
  if (kind < 0 || kind > 2) return -1;
  if (kind == GW_RPC_FUNCTION && htab_find(&s->tab[kind], id) >= 0) graph_flush(s, 1); /* (rebound) */
  return htab_put(&s->tab[kind], id, handle, aux);
}

static void params_drop(gw_rpc_sess_t *s, uint64_t id) {
  long j = htab_find(&s->tab[GW_RPC_PARAMS], id);
  if (j < 0) return;
  free((void *)(uintptr_t)s->tab[GW_RPC_PARAMS].vals[j]);
  htab_del(&s->tab[GW_RPC_PARAMS], id);
}

int gw_rpc_unbind(gw_rpc_sess_t *s, int kind, uint64_t id) {
  if (kind < 0 || kind > 2) return -1;
  if (kind == GW_RPC_FUNCTION) {
    params_drop(s, id);
    graph_flush(s, 1); /* no graph may outlive a function it launches */
  }
  return htab_del(&s->tab[kind], id);
}

int gw_rpc_bind_params(gw_rpc_sess_t *s, uint64_t id, const uint32_t *offs, uint32_t n) {
  if (htab_find(&s->tab[GW_RPC_PARAMS], id) >= 0) graph_flush(s, 1);
  params_drop(s, id);
  if (n == 0 || n > GW_RPC_MAXPARAMS) return 0; /* the buffer form */
  uint32_t *a = malloc(n * sizeof(uint32_t));
  if (!a) return -1;
  memcpy(a, offs, n * sizeof(uint32_t));
  if (htab_put(&s->tab[GW_RPC_PARAMS], id, (uint64_t)(uintptr_t)a, n)) {
    free(a);
    return -1;
  }
  return 0;
}

int gw_rpc_alloc_add(gw_rpc_sess_t *s, uint64_t start, uint64_t size) {
  amap_t *m = &s->allocs;
  if (m->n == m->cap) {
    size_t nc = m->cap ? m->cap * 2 : 64;
    uint64_t *a = realloc(m->start, nc * sizeof(uint64_t));
    if (!a) return -1;
    m->start = a;
    uint64_t *b = realloc(m->size, nc * sizeof(uint64_t));
    if (!b) return -1;
    m->size = b;
    m->cap = nc;
  }
  size_t i = amap_upper(m, start);
  memmove(m->start + i + 1, m->start + i, (m->n - i) * sizeof(uint64_t));
  memmove(m->size + i + 1, m->size + i, (m->n - i) * sizeof(uint64_t));
  m->start[i] = start;
  m->size[i] = size;
  m->n++;
  return 0;
}

int gw_rpc_alloc_del(gw_rpc_sess_t *s, uint64_t start) {
  amap_t *m = &s->allocs;
  size_t i = amap_upper(m, start);
  if (i == 0 || m->start[i - 1] != start) return -1;
  i--;
  memmove(m->start + i, m->start + i + 1, (m->n - i - 1) * sizeof(uint64_t));
  memmove(m->size + i, m->size + i + 1, (m->n - i - 1) * sizeof(uint64_t));
  m->n--;
  return 0;
}

int gw_rpc_range_ok(gw_rpc_sess_t *s, uint64_t ptr, uint64_t n) { return amap_ok(&s->allocs, ptr, n); }

/* ------------------------------------------------------------------ dispatch */

typedef int (*launch_fn)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *,
                         void **, void **);
typedef int (*memset8_fn)(uint64_t, unsigned char, size_t, void *);
typedef int (*memset16_fn)(uint64_t, unsigned short, size_t, void *);
typedef int (*memset32_fn)(uint64_t, unsigned int, size_t, void *);
typedef int (*dtod_fn)(uint64_t, uint64_t, size_t, void *);
typedef int (*evrec_fn)(void *, void *);
typedef int (*waitev_fn)(void *, void *, unsigned int);

static int tr_stream(gw_rpc_sess_t *s, uint64_t id, void **out, char *err, size_t errlen) {
  if (id <= 2) { /* NULL, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD pass through */
    *out = (void *)(uintptr_t)id;
    return 0;
  }
  long j = htab_find(&s->tab[GW_RPC_STREAM], id);
  if (j < 0) {
    errf(err, errlen, "stream 0x%llx is not a live stream of this session", (unsigned long long)id);
    return GW_CU_INVALID_HANDLE;
  }
  *out = (void *)(uintptr_t)s->tab[GW_RPC_STREAM].vals[j];
  return 0;
}

static int tr_handle(gw_rpc_sess_t *s, int kind, uint64_t id, void **out, uint32_t *aux, char *err,
                     size_t errlen) {
  static const char *names[3] = {"stream", "event", "function"};
  long j = id ? htab_find(&s->tab[kind], id) : -1;
  if (j < 0) {
    if (id == 0)
      errf(err, errlen, "NULL %s", names[kind]);
    else
      errf(err, errlen, "%s 0x%llx is not a live %s of this session", names[kind], (unsigned long long)id,
           names[kind]);
    return GW_CU_INVALID_HANDLE;
  }
  *out = (void *)(uintptr_t)s->tab[kind].vals[j];
  if (aux) *aux = s->tab[kind].aux[j];
  return 0;
}

static int range(gw_rpc_sess_t *s, uint64_t p, uint64_t n, const char *what, char *err, size_t errlen) {
  if (!amap_ok(&s->allocs, p, n)) {
    errf(err, errlen, "%s: device range 0x%llx+%llu is not inside an allocation of this session", what,
         (unsigned long long)p, (unsigned long long)n);
    return GW_CU_INVALID_VALUE;
  }
  return 0;
}

/* one hot record: its CUresult, or -1 when it is not one C runs (Python does) */
static int exec_one(gw_rpc_sess_t *s, const uint8_t *frame, const gw_rpc_rec_t *r, int which, char *err,
                    size_t errlen) {
    const uint8_t *f = frame + r->fixed;
    int rc = 0;
    void *st = NULL;
    switch (which) {
      case GW_RPC_LAUNCH: {
        if (r->nvar < 1 || r->var_off[0] == 0xFFFFFFFFu) return -1; /* bulk params: Python */
        void *fh;
        uint32_t psize = 0;
        rc = tr_handle(s, GW_RPC_FUNCTION, rd64(f), &fh, &psize, err, errlen);
        if (!rc) rc = tr_stream(s, rd64(f + 36), &st, err, errlen);
        if (rc) break;
        size_t plen = r->var_len[0];
        if (plen != psize) {
          errf(err, errlen, "cuLaunchKernel: parameter buffer is %zu B, the kernel takes %u", plen, psize);
          rc = GW_CU_INVALID_VALUE;
          break;
        }
        uint8_t *pbuf = (uint8_t *)(frame + r->var_off[0]);
        size_t sz = plen;
        void *extra[5] = {(void *)1, pbuf, (void *)2, &sz, (void *)0};
        void *kp[GW_RPC_MAXPARAMS];
        void **kpp = NULL;
        long pj = plen ? htab_find(&s->tab[GW_RPC_PARAMS], rd64(f)) : -1;
        if (pj >= 0) {
          const uint32_t *offs = (const uint32_t *)(uintptr_t)s->tab[GW_RPC_PARAMS].vals[pj];
          uint32_t np = s->tab[GW_RPC_PARAMS].aux[pj];
          for (uint32_t q = 0; q < np; q++) {
            if (offs[q] >= plen) { np = 0; break; } /* (checked at bind; never past the buffer) */
            kp[q] = pbuf + offs[q];
          }
          if (np) kpp = kp;
        }
        rc = ((launch_fn)s->fn[which])(fh, rd32(f + 8), rd32(f + 12), rd32(f + 16), rd32(f + 20), rd32(f + 24),
                                       rd32(f + 28), rd32(f + 32), st, kpp, (plen && !kpp) ? extra : NULL);
        if (rc) errf(err, errlen, "cuLaunchKernel");
        break;
      }
      case GW_RPC_MEMSET8: {
        uint64_t dst = rd64(f), cnt = rd64(f + 9);
        rc = range(s, dst, cnt, "dstDevice", err, errlen);
        if (!rc) rc = tr_stream(s, rd64(f + 17), &st, err, errlen);
        if (!rc) {
          rc = ((memset8_fn)s->fn[which])(dst, f[8], (size_t)cnt, st);
          if (rc) errf(err, errlen, "cuMemsetD8Async");
        }
        break;
      }
      case GW_RPC_MEMSET16: {
        uint64_t dst = rd64(f), cnt = rd64(f + 10);
        if (cnt > UINT64_MAX / 2) { rc = GW_CU_INVALID_VALUE; errf(err, errlen, "N too large"); break; }
        if (dst % 2) { rc = GW_CU_INVALID_VALUE; errf(err, errlen, "cuMemset: 0x%llx is not 2-byte aligned",
                                                      (unsigned long long)dst); break; }
        rc = range(s, dst, cnt * 2, "dstDevice", err, errlen);
        if (!rc) rc = tr_stream(s, rd64(f + 18), &st, err, errlen);
        if (!rc) {
          rc = ((memset16_fn)s->fn[which])(dst, rd16(f + 8), (size_t)cnt, st);
          if (rc) errf(err, errlen, "cuMemsetD16Async");
        }
        break;
      }
      case GW_RPC_MEMSET32: {
        uint64_t dst = rd64(f), cnt = rd64(f + 12);
        if (cnt > UINT64_MAX / 4) { rc = GW_CU_INVALID_VALUE; errf(err, errlen, "N too large"); break; }
        if (dst % 4) { rc = GW_CU_INVALID_VALUE; errf(err, errlen, "cuMemset: 0x%llx is not 4-byte aligned",
                                                      (unsigned long long)dst); break; }
        rc = range(s, dst, cnt * 4, "dstDevice", err, errlen);
        if (!rc) rc = tr_stream(s, rd64(f + 20), &st, err, errlen);
        if (!rc) {
          rc = ((memset32_fn)s->fn[which])(dst, rd32(f + 8), (size_t)cnt, st);
          if (rc) errf(err, errlen, "cuMemsetD32Async");
        }
        break;
      }
      case GW_RPC_DTOD: {
        uint64_t dst = rd64(f), src = rd64(f + 8), cnt = rd64(f + 16);
        rc = range(s, dst, cnt, "dstDevice", err, errlen);
        if (!rc) rc = range(s, src, cnt, "srcDevice", err, errlen);
        if (!rc) rc = tr_stream(s, rd64(f + 24), &st, err, errlen);
        if (!rc && cnt) {
          rc = ((dtod_fn)s->fn[which])(dst, src, (size_t)cnt, st);
          if (rc) errf(err, errlen, "cuMemcpyDtoDAsync");
        }
        break;
      }
      case GW_RPC_EVREC: {
        void *ev;
        rc = tr_handle(s, GW_RPC_EVENT, rd64(f), &ev, NULL, err, errlen);
        if (!rc) rc = tr_stream(s, rd64(f + 8), &st, err, errlen);
        if (!rc) {
          rc = ((evrec_fn)s->fn[which])(ev, st);
          if (rc) errf(err, errlen, "cuEventRecord");
        }
        break;
      }
      case GW_RPC_WAITEV: {
        void *ev;
        rc = tr_stream(s, rd64(f), &st, err, errlen);
        if (!rc) rc = tr_handle(s, GW_RPC_EVENT, rd64(f + 8), &ev, NULL, err, errlen);
        if (!rc) {
          rc = ((waitev_fn)s->fn[which])(st, ev, rd32(f + 16));
          if (rc) errf(err, errlen, "cuStreamWaitEvent");
        }
        break;
      }
      default:
        return -1;
    }
    return rc;
}

/* ------------------------------------------------------------------ launch-run graphs */

typedef int (*g_create_fn)(void **, unsigned);
typedef int (*g_add_fn)(void **, void *, void *const *, size_t, const gw_rpc_knode_t *);
typedef int (*g_inst_fn)(void **, void *, unsigned long long);
typedef int (*g_launch_fn)(void *, void *);
typedef int (*g_set_fn)(void *, void *, const gw_rpc_knode_t *);
typedef int (*g_destroy_fn)(void *);

static void gent_clear(gw_rpc_sess_t *s, gent_t *e) {
  if (e->exec) ((g_destroy_fn)s->g.exec_destroy)(e->exec);
  if (e->graph) ((g_destroy_fn)s->g.destroy)(e->graph);
  free(e->sig);
  free(e->nodes);
  free(e->params);
  free(e->poff);
  memset(e, 0, sizeof(*e));
}

static void graph_flush(gw_rpc_sess_t *s, int count) {
  if (!s->g_ents) return;
  int any = 0;
  for (uint32_t i = 0; i < s->g_cap; i++)
    if (s->g_ents[i].key) {
      gent_clear(s, &s->g_ents[i]);
      any = 1;
    }
  if (any && count) s->g_stat[GW_RPC_GS_FLUSHES]++;
}

void gw_rpc_graph_flush(gw_rpc_sess_t *s) { graph_flush(s, 1); }

uint64_t gw_rpc_graph_stat(gw_rpc_sess_t *s, int which) {
  return (which >= 0 && which < GW_RPC_GS_N) ? s->g_stat[which] : 0;
}

int gw_rpc_graph_setup(gw_rpc_sess_t *s, const gw_rpc_graph_fns_t *fns, uint32_t min_run, uint32_t cache) {
  graph_flush(s, 0);
  free(s->g_ents);
  s->g_ents = NULL;
  s->g_min = s->g_cap = 0;
  if (!fns || min_run == 0 || cache == 0) return 0;
  if (!fns->create || !fns->add_kernel || !fns->instantiate || !fns->launch || !fns->set_params ||
      !fns->exec_destroy || !fns->destroy)
    return -1;
  s->g_ents = calloc(cache, sizeof(gent_t));
  if (!s->g_ents) return -1;
  s->g = *fns;
  s->g_min = min_run < 2 ? 2 : min_run;
  s->g_cap = cache;
  return 0;
}

/* a launch record's parts the graph needs: function, stream wire id, parameter bytes and
 * the parameter offsets (NULL with np 0: no parameters); 0 if C cannot graph it */
static int g_rec(gw_rpc_sess_t *s, const uint8_t *frame, const gw_rpc_rec_t *r, void **fh, const uint8_t **pbuf,
                 const uint32_t **offs, uint32_t *np) {
  if (s->hot_by_id[r->id] != GW_RPC_LAUNCH || r->nvar < 1 || r->var_off[0] == 0xFFFFFFFFu) return 0;
  const uint8_t *f = frame + r->fixed;
  long j = htab_find(&s->tab[GW_RPC_FUNCTION], rd64(f));
  if (j < 0) return 0;
  uint32_t plen = r->var_len[0];
  if (plen != s->tab[GW_RPC_FUNCTION].aux[j]) return 0;
  *fh = (void *)(uintptr_t)s->tab[GW_RPC_FUNCTION].vals[j];
  *pbuf = frame + r->var_off[0];
  *offs = NULL;
  *np = 0;
  if (plen) {
    long pj = htab_find(&s->tab[GW_RPC_PARAMS], rd64(f));
    if (pj < 0) return 0; /* the buffer form: not graphed */
    const uint32_t *o = (const uint32_t *)(uintptr_t)s->tab[GW_RPC_PARAMS].vals[pj];
    uint32_t n = s->tab[GW_RPC_PARAMS].aux[pj];
    for (uint32_t q = 0; q < n; q++)
      if (o[q] >= plen) return 0;
    *offs = o;
    *np = n;
  }
  return 1;
}

static void g_node(gw_rpc_knode_t *kn, void *fh, const uint8_t *f, const uint8_t *pbuf, const uint32_t *offs,
                   uint32_t np, void **kp) {
  memset(kn, 0, sizeof(*kn));
  kn->func = fh;
  kn->gridDimX = rd32(f + 8);
  kn->gridDimY = rd32(f + 12);
  kn->gridDimZ = rd32(f + 16);
  kn->blockDimX = rd32(f + 20);
  kn->blockDimY = rd32(f + 24);
  kn->blockDimZ = rd32(f + 28);
  kn->sharedMemBytes = rd32(f + 32);
  for (uint32_t q = 0; q < np; q++) kp[q] = (void *)(pbuf + offs[q]);
  if (np < GW_RPC_MAXPARAMS) kp[np] = NULL; /* (the driver reads np of them) */
  kn->kernelParams = np ? kp : NULL;
}

/* build and instantiate the graph of run e from the records at recs[i..]; 0 or a CUresult */
static int g_build(gw_rpc_sess_t *s, gent_t *e, const uint8_t *frame, const gw_rpc_rec_t *recs, uint32_t i) {
  uint32_t n = e->n;
  size_t ptot = 0;
  for (uint32_t k = 0; k < n; k++) ptot += e->sig[k].plen;
  e->nodes = calloc(n, sizeof(void *));
  e->poff = calloc(n + 1, sizeof(uint32_t));
  e->params = malloc(ptot ? ptot : 1);
  if (!e->nodes || !e->poff || !e->params) return GW_CU_INVALID_VALUE;
  int rc = ((g_create_fn)s->g.create)(&e->graph, 0);
  if (rc) {
    e->graph = NULL;
    return rc;
  }
  void *kp[GW_RPC_MAXPARAMS];
  uint32_t off = 0;
  for (uint32_t k = 0; k < n; k++) {
    void *fh;
    const uint8_t *pbuf;
    const uint32_t *offs;
    uint32_t np;
    if (!g_rec(s, frame, &recs[i + k], &fh, &pbuf, &offs, &np)) return GW_CU_INVALID_VALUE;
    gw_rpc_knode_t kn;
    g_node(&kn, fh, frame + recs[i + k].fixed, pbuf, offs, np, kp);
    void *const *dep = k ? &e->nodes[k - 1] : NULL;
    rc = ((g_add_fn)s->g.add_kernel)(&e->nodes[k], e->graph, dep, k ? 1 : 0, &kn);
    if (rc) return rc;
    e->poff[k] = off;
    memcpy(e->params + off, pbuf, e->sig[k].plen);
    off += e->sig[k].plen;
  }
  e->poff[n] = off;
  rc = ((g_inst_fn)s->g.instantiate)(&e->exec, e->graph, 0);
  if (rc) e->exec = NULL;
  return rc;
}

static inline uint64_t g_mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
  return h * 0xBF58476D1CE4E5B9ULL;
}

/* Launch records from recs[i] (before `end`): if they start a run C graphs, replay it and
 * return how many records it covered (> 0). 0: run recs[i] one by one; *skip_to is then where
 * the next attempt may start (the records before it belong to a run that is not replayed). */
static uint32_t graph_run(gw_rpc_sess_t *s, const uint8_t *frame, const gw_rpc_rec_t *recs, uint32_t i,
                          uint32_t end, uint32_t *skip_to) {
  *skip_to = i + 1;
  if (!s->g_cap) return 0;
  uint64_t stream_id = rd64(frame + recs[i].fixed + 36);
  if (!s->g_sig) {
    s->g_sig = malloc(64 * sizeof(gsig_t));
    if (!s->g_sig) return 0;
    s->g_sig_cap = 64;
  }
  gsig_t *sv = s->g_sig;
  uint32_t m = 0;
  uint64_t h = 0x2545F4914F6CDD1DULL;
  while (i + m < end && m < GW_RPC_GRAPH_MAXRUN) {
    const gw_rpc_rec_t *r = &recs[i + m];
    void *fh;
    const uint8_t *pbuf;
    const uint32_t *offs;
    uint32_t np;
    if (!g_rec(s, frame, r, &fh, &pbuf, &offs, &np)) break;
    const uint8_t *f = frame + r->fixed;
    if (rd64(f + 36) != stream_id) break;
    if (m == s->g_sig_cap) {
      gsig_t *nv = realloc(sv, 2 * (size_t)m * sizeof(gsig_t));
      if (!nv) break;
      s->g_sig = sv = nv;
      s->g_sig_cap = 2 * m;
    }
    gsig_t *g = &sv[m];
    g->fid = rd64(f);
    for (int q = 0; q < 7; q++) g->dim[q] = rd32(f + 8 + 4 * q);
    g->plen = r->var_len[0];
    h = g_mix(h, g->fid);
    h = g_mix(h, ((uint64_t)g->dim[0] << 32) | g->dim[3]);
    h = g_mix(h, ((uint64_t)g->dim[1] << 48) ^ ((uint64_t)g->dim[2] << 32) ^ ((uint64_t)g->dim[4] << 16) ^
                     g->dim[5] ^ ((uint64_t)g->dim[6] << 20) ^ ((uint64_t)g->plen << 40));
    m++;
  }
  uint32_t out = 0;
  if (m < s->g_min) {
    *skip_to = i + (m ? m : 1);
    goto done;
  }
  *skip_to = i + m;
  h = g_mix(h, m);
  if (!h) h = 1;
  s->g_tick++;
  gent_t *e = NULL, *victim = NULL;
  for (uint32_t k = 0; k < s->g_cap; k++) {
    gent_t *x = &s->g_ents[k];
    if (x->key == h && x->n == m && !memcmp(x->sig, sv, m * sizeof(gsig_t))) {
      e = x;
      break;
    }
    if (!victim || !x->key || (victim->key && x->used < victim->used)) victim = x;
  }
  if (!e) { /* first time: remember it, run it one by one */
    if (victim->key) {
      gent_clear(s, victim);
      s->g_stat[GW_RPC_GS_EVICTED]++;
    }
    victim->sig = malloc(m * sizeof(gsig_t));
    if (!victim->sig) goto done;
    memcpy(victim->sig, sv, m * sizeof(gsig_t));
    victim->key = h;
    victim->n = m;
    victim->used = s->g_tick;
    goto done;
  }
  e->used = s->g_tick;
  if (e->failed) goto done;
  void *st = NULL;
  if (tr_stream(s, stream_id, &st, NULL, 0)) goto done;
  int rc = 0;
  if (!e->exec) {
    rc = g_build(s, e, frame, recs, i);
    if (rc) goto failed;
    s->g_stat[GW_RPC_GS_BUILT]++;
  } else {
    void *kp[GW_RPC_MAXPARAMS];
    for (uint32_t k = 0; k < m; k++) {
      const gw_rpc_rec_t *r = &recs[i + k];
      const uint8_t *pnew = frame + r->var_off[0];
      uint32_t pl = sv[k].plen;
      if (!pl || !memcmp(e->params + e->poff[k], pnew, pl)) continue;
      void *fh;
      const uint8_t *pbuf;
      const uint32_t *offs;
      uint32_t np;
      if (!g_rec(s, frame, r, &fh, &pbuf, &offs, &np)) goto failed;
      gw_rpc_knode_t kn;
      g_node(&kn, fh, frame + r->fixed, pbuf, offs, np, kp);
      rc = ((g_set_fn)s->g.set_params)(e->exec, e->nodes[k], &kn);
      if (rc) goto failed;
      memcpy(e->params + e->poff[k], pnew, pl);
      s->g_stat[GW_RPC_GS_UPDATES]++;
    }
  }
  rc = ((g_launch_fn)s->g.launch)(e->exec, st);
  if (rc) goto failed;
  s->g_stat[GW_RPC_GS_RUNS]++;
  s->g_stat[GW_RPC_GS_LAUNCHES] += m;
  out = m;
  goto done;
failed:
  /* never again for this run: keep its entry (failed) so it is not rebuilt each time */
  {
    gsig_t *keep = e->sig;
    uint64_t key = e->key, used = e->used;
    uint32_t n = e->n;
    e->sig = NULL;
    gent_clear(s, e);
    e->sig = keep;
    e->key = key;
    e->used = used;
    e->n = n;
    e->failed = 1;
  }
  s->g_stat[GW_RPC_GS_FAILED]++;
done:
  return out;
}

uint32_t gw_rpc_exec(gw_rpc_sess_t *s, const uint8_t *frame, const gw_rpc_rec_t *recs, uint32_t from,
                     uint32_t n, int *res, char *err, size_t errlen) {
  uint32_t i = from, gnext = from;
  *res = 0;
  for (; i < n; i++) {
    const gw_rpc_rec_t *r = &recs[i];
    int which = s->hot_by_id[r->id];
    if (which < 0) break;
    if (which == GW_RPC_LAUNCH && s->g_cap && i >= gnext) {
      uint32_t done = graph_run(s, frame, recs, i, n, &gnext);
      if (done) {
        i += done - 1;
        continue;
      }
    }
    int rc = exec_one(s, frame, r, which, err, errlen);
    if (rc < 0) break;
    if (rc) {
      *res = rc;
      return i - from;
    }
  }
  return i - from;
}

int gw_rpc_launch(void *fn, uint64_t f, uint32_t gx, uint32_t gy, uint32_t gz, uint32_t bx, uint32_t by,
                  uint32_t bz, uint32_t shmem, uint64_t stream, const void *params, size_t n) {
  size_t sz = n;
  void *extra[5] = {(void *)1, (void *)params, (void *)2, &sz, (void *)0};
  return ((launch_fn)fn)((void *)(uintptr_t)f, gx, gy, gz, bx, by, bz, shmem, (void *)(uintptr_t)stream, NULL,
                         n ? extra : NULL);
}

/* ------------------------------------------------------------------ C server */

typedef int (*dtoh_fn)(void *, uint64_t, size_t, void *);
typedef int (*ssync_fn)(void *);
typedef int (*csync_fn)(void);

#define GW_MAGIC 0x5747
#define GW_VERSION 1
#define GW_F_SYNC 0x01
#define GW_F_HELLO 0x02
#define GW_F_BYE 0x04
#define GW_F_KNOWN 0x07
#define GW_HDR 16

/* a frame header (protocol.py HEADER '<HBBIII': magic, version, flags, seq, ncalls, body bytes) */
static inline void wr_hdr(uint8_t *p, uint8_t flags, uint32_t seq, uint32_t ncalls, uint32_t body) {
  uint16_t mg = GW_MAGIC;
  memcpy(p, &mg, 2);
  p[2] = GW_VERSION;
  p[3] = flags;
  memcpy(p + 4, &seq, 4);
  memcpy(p + 8, &ncalls, 4);
  memcpy(p + 12, &body, 4);
}
#define GW_TAG_REP 0x000002

/* what kind of C call a record is: hot index, DTOH_ASYNC/STREAM_SYNC/CTX_SYNC, 100 for gwSync, -1 none */
static int srv_kind(const gw_rpc_srv_t *v, const gw_rpc_rec_t *r) {
  gw_rpc_sess_t *s = v->s;
  int w = s->hot_by_id[r->id];
  if (w >= 0) {
    if (w == GW_RPC_LAUNCH && (r->nvar < 1 || r->var_off[0] == 0xFFFFFFFFu)) return -1;
    return w;
  }
  if (r->id == v->id_gwsync) return 100;
  for (int k = GW_RPC_DTOH_ASYNC; k < GW_RPC_NCALLS; k++)
    if (r->id == v->ids[k] && v->fn[k]) return k;
  return -1;
}

static inline int64_t tr_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t gw_rpc_now_ns(void) { return tr_now(); }

/* the trace row of the frame a handler call got (NULL: tracing is off); t_in 0: now */
static gw_rpc_trace_t *tr_start(gw_rpc_srv_t *v, const uint8_t *fr, size_t len, int64_t t_in) {
  if (!v->trace || !v->trace_cap) return NULL;
  gw_rpc_trace_t *tr = &v->trace[v->trace_n % v->trace_cap];
  memset(tr, 0, sizeof(*tr));
  tr->t_in = t_in ? t_in : tr_now();
  v->trace_n++;
  if (len >= GW_HDR) {
    tr->seq = rd32(fr + 4);
    tr->ncalls = rd32(fr + 8);
    tr->flags = (fr[3] & GW_F_SYNC) ? GW_RPC_TR_SYNC : 0;
  }
  return tr;
}

static int srv_pass(gw_rpc_srv_t *v, gw_rpc_trace_t *tr) {
  v->passed++;
  if (tr) {
    tr->flags |= GW_RPC_TR_PASS;
    tr->t_out = tr_now();
  }
  return 0; /* GW_SERVE_PASS */
}

int gw_rpc_serve_handler(void *arg, void *msg, size_t len, gw_rpc_msg_t *out, int maxout, int *nout) {
  gw_rpc_srv_t *v = (gw_rpc_srv_t *)arg;
  const uint8_t *fr = (const uint8_t *)msg;
  *nout = 0;
  v->resume = 0;
  v->tail_n = 0;
  gw_rpc_trace_t *tr = tr_start(v, fr, len, 0);
  if (!v->enabled || !v->s || len < GW_HDR) return srv_pass(v, tr);
  uint16_t magic = rd16(fr);
  uint8_t ver = fr[2], flags = fr[3];
  uint32_t seq = rd32(fr + 4), ncalls = rd32(fr + 8), blen = rd32(fr + 12);
  if (magic != GW_MAGIC || ver != GW_VERSION || (flags & ~GW_F_KNOWN) || (flags & (GW_F_HELLO | GW_F_BYE)) ||
      blen != len - GW_HDR || ncalls == 0 || ncalls > v->nrecs || (v->seq_on && seq != v->next_seq))
    return srv_pass(v, tr);
  int sync = (flags & GW_F_SYNC) != 0;
  if (gw_rpc_scan(fr, GW_HDR, len, ncalls, sync, v->desc, v->ndesc, v->recs, NULL, 0)) return srv_pass(v, tr);
  /* every record must be one C runs; the pushes must fit (into this call's half of scratch
   * when pushes are deferred sends) */
  uint8_t *scratch = v->scratch;
  uint64_t cap = v->scratch_cap;
  if (v->defer) {
    cap = (v->scratch_cap / 2) & ~(uint64_t)63;
    scratch += (v->flip & 1) * cap;
  }
  uint64_t need = 0, tneed = 0;
  int npush = 0;
  for (uint32_t i = 0; i < ncalls; i++) {
    const gw_rpc_rec_t *r = &v->recs[i];
    int k = srv_kind(v, r);
    if (k < 0) return srv_pass(v, tr);
    int last_sync = sync && i == ncalls - 1;
    int is_sync = (k == 100 || k == GW_RPC_STREAM_SYNC || k == GW_RPC_CTX_SYNC);
    if (is_sync != last_sync) return srv_pass(v, tr); /* (the scanner enforces the position) */
    if (k == GW_RPC_DTOH_ASYNC) {
      uint64_t n = rd64(fr + r->fixed + 8);
      if (!v->fn[GW_RPC_STREAM_SYNC] || (v->chunk && n > v->chunk)) return srv_pass(v, tr);
      if (v->lane_min && n >= v->lane_min && r->route[0] != GW_RPC_ROUTE_REPLY) return srv_pass(v, tr);
      need += (n + 7) & ~(uint64_t)7;
      if (need > cap) return srv_pass(v, tr);
      if (r->route[0] == GW_RPC_ROUTE_REPLY) { /* into the reply tail (Python checks the rest) */
        tneed += 4 + n;
        if (n > GW_RPC_REPLY_INLINE_LIMIT || !v->tail || tneed > v->tail_cap) return srv_pass(v, tr);
      } else if (++npush >= maxout) {
        return srv_pass(v, tr);
      }
    }
  }
  if (sync && !(ncalls >= 1)) return srv_pass(v, tr);
  if (tr) tr->t_scan = tr_now();
  /* run */
  uint64_t used = 0;
  /* the stream (wire id) whose work a push's wait has just seen complete, with nothing issued
   * since: a cuStreamSynchronize of it now has nothing to wait for (skip_ssync) */
  uint64_t synced = 0;
  int have_synced = 0;
  uint32_t gnext = 0; /* (launch-run graphs: where the next run may start) */
  for (uint32_t i = 0; i < ncalls; i++) {
    const gw_rpc_rec_t *r = &v->recs[i];
    const uint8_t *f = fr + r->fixed;
    int k = srv_kind(v, r);
    int rc = 0;
    v->err[0] = 0;
    if (k == GW_RPC_LAUNCH && v->s->g_cap && i >= gnext) {
      uint32_t done = graph_run(v->s, fr, v->recs, i, ncalls, &gnext);
      if (done) {
        i += done - 1;
        have_synced = 0;
        if (tr && !tr->t_first) tr->t_first = tr_now();
        continue;
      }
    }
    if (k < GW_RPC_NHOT) {
      rc = exec_one(v->s, fr, r, k, v->err, sizeof(v->err));
      have_synced = 0;
      if (tr && !tr->t_first) tr->t_first = tr_now();
    } else if (k == GW_RPC_DTOH_ASYNC) {
      uint64_t src = rd64(f), n = rd64(f + 8);
      void *st = NULL;
      rc = range(v->s, src, n, "srcDevice", v->err, sizeof(v->err));
      if (!rc) rc = tr_stream(v->s, rd64(f + 16), &st, v->err, sizeof(v->err));
      uint8_t *dst = scratch + used;
      if (!rc && n) {
        rc = ((dtoh_fn)v->fn[GW_RPC_DTOH_ASYNC])(dst, src, (size_t)n, st);
        if (rc) errf(v->err, sizeof(v->err), "cuMemcpyDtoHAsync");
      }
      have_synced = 0;
      if (tr) {
        int64_t t = tr_now();
        if (!tr->t_first) tr->t_first = t;
        if (!tr->t_issued) tr->t_issued = t;
      }
      if (!rc && n >= 65536 && v->fn_query && v->progress && v->worker) {
        /* the bytes go out once copied; meanwhile the previous push keeps moving (bulk pushes
         * only: small ones, like a loss value per step, wait as before) */
        while ((rc = ((ssync_fn)v->fn_query)(st)) == 600 /* CUDA_ERROR_NOT_READY */)
          ((int (*)(void *))v->progress)(v->worker);
        if (rc) errf(v->err, sizeof(v->err), "cuStreamQuery (before the push)");
      } else if (!rc) {
        rc = ((ssync_fn)v->fn[GW_RPC_STREAM_SYNC])(st); /* the bytes go out once copied */
        if (rc) errf(v->err, sizeof(v->err), "cuStreamSynchronize (before the push)");
        synced = rd64(f + 16);
        have_synced = !rc;
      }
      if (tr) tr->t_waited = tr_now();
      if (!rc && r->route[0] == GW_RPC_ROUTE_REPLY) {
        uint32_t n32 = (uint32_t)n; /* the sync reply carries it: length, bytes */
        memcpy(v->tail + v->tail_n, &n32, 4);
        memcpy(v->tail + v->tail_n + 4, dst, (size_t)n);
        v->tail_n += 4 + n32;
      } else if (!rc) {
        out[*nout].tag = r->route[0];
        out[*nout].flags = v->defer ? GW_RPC_MSG_DEFER : 0;
        out[*nout].buf = dst;
        out[*nout].len = (size_t)n;
        (*nout)++;
        v->pushes++;
        used += (n + 7) & ~(uint64_t)7;
      }
    } else if (k == GW_RPC_STREAM_SYNC) {
      void *st = NULL;
      rc = tr_stream(v->s, rd64(f), &st, v->err, sizeof(v->err));
      if (tr && !tr->t_issued) tr->t_issued = tr_now();
      if (!rc && v->skip_ssync && have_synced && rd64(f) == synced) {
        v->ssync_skipped++; /* the push's wait just saw this stream's work complete */
      } else if (!rc) {
        rc = ((ssync_fn)v->fn[GW_RPC_STREAM_SYNC])(st);
        if (rc) errf(v->err, sizeof(v->err), "cuStreamSynchronize");
        if (tr) tr->t_waited = tr_now();
      }
    } else if (k == GW_RPC_CTX_SYNC) {
      if (tr && !tr->t_issued) tr->t_issued = tr_now();
      rc = ((csync_fn)v->fn[GW_RPC_CTX_SYNC])();
      if (rc) errf(v->err, sizeof(v->err), "cuCtxSynchronize");
      if (tr) tr->t_waited = tr_now();
    }
    if (rc) {
      v->resume = 1;
      v->resume_at = i;
      v->resume_res = rc;
      v->ran += i;
      if (tr) tr->npush = (uint32_t)*nout;
      return srv_pass(v, tr);
    }
  }
  v->ran += ncalls;
  v->frames++;
  v->next_seq = seq + 1;
  v->flip ^= 1; /* the next call uses the other half: this call's pushes may still be in flight */
  if (sync) {
    uint8_t *p = v->rep;
    uint32_t tn = v->tail_n, zero = 0;
    wr_hdr(p, 0, seq, 1, 13 + tn);
    memcpy(p + 16, &zero, 4);      /* frame status */
    memcpy(p + 20, &v->pushes, 4); /* pushes so far */
    if (tn) memcpy(p + 24, v->tail, tn); /* the reply tail: D2H results routed here */
    memcpy(p + 24 + tn, &zero, 4); /* the sync call's CUresult (its reply is '<I') */
    p[28 + tn] = 0;                /* no deferred-error report */
    out[*nout].tag = v->rep_tag;
    out[*nout].flags = 0;
    out[*nout].buf = v->rep;
    out[*nout].len = GW_HDR + 13 + tn;
    (*nout)++;
  }
  if (tr) {
    if (!tr->t_issued) tr->t_issued = tr_now();
    tr->npush = (uint32_t)npush;
    tr->t_out = tr_now();
  }
  return 1; /* GW_SERVE_NEXT */
}

uintptr_t gw_rpc_serve_handler_addr(void) { return (uintptr_t)gw_rpc_serve_handler; }

/* ------------------------------------------------------------------ client flush timer */

#define GW_TIMER_LINGER_MORE 3 /* after a batch: awake for 1 + this many delays without a new one */

struct gw_rpc_timer {
  /* three cache lines apart: what the waiter writes at each wake (its mutex, condvar and
   * bookkeeping), what the arming thread writes per batch, and the frame seq cell the client
   * writes per frame, so neither side's writes evict the other's lines in between */
  pthread_mutex_t mu;   /* the waiter's sleeps and their wake-ups only: an arm takes it only
                         * to wake a waiter that sleeps untimed */
  pthread_cond_t cv;
  int64_t delay_ns;
  uint32_t armed_gen;   /* gen of the arm the waiter dealt with last (waiter only) */
  int stop;
  uint64_t wakes[3];    /* the waiter's returns from its waits: at a due time, after lingering,
                         * from its untimed sleep (diagnosis: gw_rpc_timer_wakes) */
  int64_t linger_until; /* after a batch: stay awake (timed wait) until then, see gw_rpc_timer_wait */
  int linger_left;      /* windows of one delay still to stay awake without a new batch */
  /* the last batch armed: written by the arming thread without a lock (a seqlock: gen is
   * odd while it writes), read by the waiter */
  _Alignas(64) uint32_t gen;
  uint32_t armed_seq;
  int64_t armed_at;
  uint64_t signals;     /* arms that had to wake the waiter (tests, diagnosis) */
  int idle;             /* the waiter sleeps (or is about to sleep) untimed */
  _Alignas(64) uint32_t cur_seq; /* written by the client (frame being built), read here */
};

static int64_t mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

gw_rpc_timer_t *gw_rpc_timer_new(int64_t delay_ns) {
  gw_rpc_timer_t *t = NULL;
  if (posix_memalign((void **)&t, 64, sizeof(*t)) || !t) return NULL;
  memset(t, 0, sizeof(*t));
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&t->cv, &ca);
  pthread_condattr_destroy(&ca);
  pthread_mutex_init(&t->mu, NULL);
  t->delay_ns = delay_ns > 0 ? delay_ns : 1;
  return t;
}

void gw_rpc_timer_free(gw_rpc_timer_t *t) {
  if (!t) return;
  pthread_cond_destroy(&t->cv);
  pthread_mutex_destroy(&t->mu);
  free(t);
}

uint32_t *gw_rpc_timer_seqp(gw_rpc_timer_t *t) { return &t->cur_seq; }

/* One arming thread at a time (the client's session lock / wire lock serialise its
 * callers). No lock on this path: a caller never blocks here on the waiter, whose wake-ups
 * (one per delay while batches flow) would otherwise meet the next batch's arm whenever a
 * loop's period is close to the delay. */
void gw_rpc_timer_arm(gw_rpc_timer_t *t, uint32_t seq) {
  int64_t now = mono_ns();
  uint32_t g = __atomic_load_n(&t->gen, __ATOMIC_RELAXED);
  __atomic_store_n(&t->gen, g + 1, __ATOMIC_RELAXED); /* odd: writing */
  __atomic_thread_fence(__ATOMIC_RELEASE);
  __atomic_store_n(&t->armed_seq, seq, __ATOMIC_RELAXED);
  __atomic_store_n(&t->armed_at, now, __ATOMIC_RELAXED);
  /* even again; seq_cst pairs with the waiter's idle store and armed check (one of the two
   * sees the other's store: no lost wake-up) */
  __atomic_store_n(&t->gen, g + 2, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&t->idle, __ATOMIC_SEQ_CST) && __atomic_exchange_n(&t->idle, 0, __ATOMIC_SEQ_CST)) {
    /* (only the first arm after the waiter went idle wakes it; the exchange, like a load,
     * is ordered after the gen store) */
    __atomic_fetch_add(&t->signals, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&t->mu); /* the waiter holds it until it sleeps: the signal reaches it */
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
  }
}

uint64_t gw_rpc_timer_signals(gw_rpc_timer_t *t) { return __atomic_load_n(&t->signals, __ATOMIC_RELAXED); }

uint64_t gw_rpc_timer_wakes(gw_rpc_timer_t *t, int kind) {
  return kind >= 0 && kind < 3 ? __atomic_load_n(&t->wakes[kind], __ATOMIC_RELAXED) : 0;
}

/* the last arm, consistently: its gen (even), seq and time */
static uint32_t timer_read_arm(gw_rpc_timer_t *t, uint32_t *seq, int64_t *at) {
  for (;;) {
    uint32_t g = __atomic_load_n(&t->gen, __ATOMIC_ACQUIRE);
    if (g & 1) {
      sched_yield();
      continue;
    }
    *seq = __atomic_load_n(&t->armed_seq, __ATOMIC_RELAXED);
    *at = __atomic_load_n(&t->armed_at, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&t->gen, __ATOMIC_RELAXED) == g) return g;
  }
}

static void timer_sleep_until(gw_rpc_timer_t *t, int64_t until, int kind) {
  struct timespec ts = {(time_t)(until / 1000000000LL), (long)(until % 1000000000LL)};
  pthread_cond_timedwait(&t->cv, &t->mu, &ts);
  __atomic_fetch_add(&t->wakes[kind], 1, __ATOMIC_RELAXED);
}

/* the arm of gen g is dealt with (sent, or returned for a flush): linger from now */
static void timer_done_with(gw_rpc_timer_t *t, uint32_t g, int64_t now) {
  t->armed_gen = g;
  t->linger_until = now + t->delay_ns;
  t->linger_left = GW_TIMER_LINGER_MORE;
}

int64_t gw_rpc_timer_wait(gw_rpc_timer_t *t) {
  pthread_mutex_lock(&t->mu);
  for (;;) {
    if (t->stop) break;
    uint32_t aseq;
    int64_t at;
    uint32_t g = timer_read_arm(t, &aseq, &at);
    int64_t now = mono_ns();
    if (g == t->armed_gen) {
      /* no batch started since the last one dealt with. A batch ended moments ago: the next
       * one (a training loop's next step) is likely soon. Wait timed for one more delay
       * without marking idle, so its arm needs no wake-up (a futex wake, an IPI in a VM, on
       * the client's critical path); then sleep untimed. */
      if (t->linger_until > now) {
        timer_sleep_until(t, t->linger_until, 1);
        continue;
      }
      if (t->linger_left > 0) { /* a loop whose period is about the delay may arm just after
                                 * a window ends: a few more windows before sleeping untimed */
        t->linger_left--;
        t->linger_until = now + t->delay_ns;
        continue;
      }
      __atomic_store_n(&t->idle, 1, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&t->gen, __ATOMIC_SEQ_CST) == g && !t->stop) {
        pthread_cond_wait(&t->cv, &t->mu);
        __atomic_fetch_add(&t->wakes[2], 1, __ATOMIC_RELAXED);
      }
      __atomic_store_n(&t->idle, 0, __ATOMIC_RELAXED);
      continue;
    }
    if (__atomic_load_n(&t->cur_seq, __ATOMIC_ACQUIRE) != aseq) {
      /* the last batch armed is already sent (a newer one would have re-armed): nothing to
       * check at its due time; stay awake one delay from now instead. In a loop that sends
       * its own batches this is one wake-up per delay, not two (due, then linger). */
      timer_done_with(t, g, now);
      continue;
    }
    int64_t due = at + t->delay_ns;
    if (now < due) {
      timer_sleep_until(t, due, 0);
      continue;
    }
    timer_done_with(t, g, now);
    pthread_mutex_unlock(&t->mu);
    return (int64_t)aseq; /* still unsent a delay after it started: flush it */
  }
  pthread_mutex_unlock(&t->mu);
  return -1;
}

void gw_rpc_timer_stop(gw_rpc_timer_t *t) {
  pthread_mutex_lock(&t->mu);
  t->stop = 1;
  pthread_mutex_unlock(&t->mu);
  pthread_cond_broadcast(&t->cv);
}

/* ------------------------------------------------------------------ host driver */

static uint64_t host_counts[GW_RPC_NCALLS];

static uint64_t host_last[3]; /* the last host launch: form (1 kernelParams, 2 buffer), params 0 and 1 */
static uint64_t host_log[4096][3]; /* the last 4096 host launches: function, params 0 and 1 */
static uint64_t host_log_n;

static int h_launch(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                    unsigned shmem, void *st, void **kp, void **extra) {
  (void)f; (void)gx; (void)gy; (void)gz; (void)bx; (void)by; (void)bz; (void)shmem; (void)st;
  if (extra && (extra[0] != (void *)1 || extra[2] != (void *)2 || extra[4] != (void *)0)) return GW_CU_INVALID_VALUE;
  if (kp && extra) return GW_CU_INVALID_VALUE;
  host_last[0] = kp ? 1 : (extra ? 2 : 0);
  if (kp) { /* the test kernel's layout: u64 at kp[0], u32 at kp[1] */
    memcpy(&host_last[1], kp[0], 8);
    uint32_t v;
    memcpy(&v, kp[1], 4);
    host_last[2] = v;
  }
  uint64_t li = __atomic_fetch_add(&host_log_n, 1, __ATOMIC_RELAXED) % 4096;
  host_log[li][0] = (uint64_t)(uintptr_t)f;
  host_log[li][1] = kp ? host_last[1] : 0;
  host_log[li][2] = kp ? host_last[2] : 0;
  __atomic_fetch_add(&host_counts[GW_RPC_LAUNCH], 1, __ATOMIC_RELAXED);
  return 0;
}
static int h_memset8(uint64_t d, unsigned char v, size_t n, void *st) {
  (void)st;
  memset((void *)(uintptr_t)d, v, n);
  __atomic_fetch_add(&host_counts[GW_RPC_MEMSET8], 1, __ATOMIC_RELAXED);
  return 0;
}
static int h_memset16(uint64_t d, unsigned short v, size_t n, void *st) {
  (void)st;
  uint16_t *p = (uint16_t *)(uintptr_t)d;
  for (size_t i = 0; i < n; i++) p[i] = v;
  __atomic_fetch_add(&host_counts[GW_RPC_MEMSET16], 1, __ATOMIC_RELAXED);
  return 0;
}
static int h_memset32(uint64_t d, unsigned int v, size_t n, void *st) {
  (void)st;
  uint32_t *p = (uint32_t *)(uintptr_t)d;
  for (size_t i = 0; i < n; i++) p[i] = v;
  __atomic_fetch_add(&host_counts[GW_RPC_MEMSET32], 1, __ATOMIC_RELAXED);
  return 0;
}
static int h_dtod(uint64_t d, uint64_t s, size_t n, void *st) {
  (void)st;
  memmove((void *)(uintptr_t)d, (const void *)(uintptr_t)s, n);
  __atomic_fetch_add(&host_counts[GW_RPC_DTOD], 1, __ATOMIC_RELAXED);
  return 0;
}
static int h_evrec(void *e, void *st) {
  (void)e; (void)st;
  __atomic_fetch_add(&host_counts[GW_RPC_EVREC], 1, __ATOMIC_RELAXED);
  return 0;
}
static int h_waitev(void *st, void *e, unsigned int fl) {
  (void)st; (void)e; (void)fl;
  __atomic_fetch_add(&host_counts[GW_RPC_WAITEV], 1, __ATOMIC_RELAXED);
  return 0;
}

static int h_dtoh(void *d, uint64_t s, size_t n, void *st) {
  (void)st;
  memmove(d, (const void *)(uintptr_t)s, n);
  __atomic_fetch_add(&host_counts[GW_RPC_DTOH_ASYNC], 1, __ATOMIC_RELAXED);
  return 0;
}
static int h_ssync(void *st) {
  (void)st;
  __atomic_fetch_add(&host_counts[GW_RPC_STREAM_SYNC], 1, __ATOMIC_RELAXED);
  return 0;
}
static int h_csync(void) {
  __atomic_fetch_add(&host_counts[GW_RPC_CTX_SYNC], 1, __ATOMIC_RELAXED);
  return 0;
}

/* host graphs: a node list; the exec's launch runs each node through h_launch with the
 * parameters h_launch reads (u64 at kp[0], u32 at kp[1]: the test kernel's layout) */
typedef struct {
  void *func;
  uint32_t dim[7];
  int np;
  uint64_t p0;
  uint32_t p1;
} hnode_t;
typedef struct {
  int is_exec;
  uint32_t n, cap;
  hnode_t *nodes;
} hgraph_t;
static uint64_t hg_counts[7];
static int64_t hg_alive;
static int hg_fail = -1; /* the next host graph call of this kind fails (tests) */
static int hg_failing(int which) {
  return __atomic_compare_exchange_n(&hg_fail, &which, -1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
void gw_rpc_graph_host_fail(int which) { __atomic_store_n(&hg_fail, which, __ATOMIC_SEQ_CST); }

static void hn_set(hnode_t *x, const gw_rpc_knode_t *kn) {
  x->func = kn->func;
  x->dim[0] = kn->gridDimX; x->dim[1] = kn->gridDimY; x->dim[2] = kn->gridDimZ;
  x->dim[3] = kn->blockDimX; x->dim[4] = kn->blockDimY; x->dim[5] = kn->blockDimZ;
  x->dim[6] = kn->sharedMemBytes;
  x->np = kn->kernelParams ? 2 : 0;
  if (kn->kernelParams) { /* (test kernels with that layout only) */
    memcpy(&x->p0, kn->kernelParams[0], 8);
    x->p1 = 0;
    if (kn->kernelParams[1]) memcpy(&x->p1, kn->kernelParams[1], 4);
  }
}
static int hg_create(void **out, unsigned fl) {
  (void)fl;
  if (hg_failing(0)) return 999; /* CUDA_ERROR_UNKNOWN */
  hgraph_t *g = calloc(1, sizeof(*g));
  if (!g) return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
  __atomic_fetch_add(&hg_counts[0], 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&hg_alive, 1, __ATOMIC_RELAXED);
  *out = g;
  return 0;
}
static int hg_add(void **node, void *graph, void *const *deps, size_t ndeps, const gw_rpc_knode_t *kn) {
  hgraph_t *g = (hgraph_t *)graph;
  if (hg_failing(1)) return 999; /* CUDA_ERROR_UNKNOWN */
  __atomic_fetch_add(&hg_counts[1], 1, __ATOMIC_RELAXED);
  if (ndeps > 1 || (ndeps && !deps)) return GW_CU_INVALID_VALUE;
  if (kn->extra || kn->kern || kn->ctx) return GW_CU_INVALID_VALUE;
  if (g->n == g->cap) {
    uint32_t nc = g->cap ? 2 * g->cap : 16;
    hnode_t *a = realloc(g->nodes, nc * sizeof(hnode_t));
    if (!a) return 2;
    g->nodes = a;
    g->cap = nc;
  }
  hn_set(&g->nodes[g->n], kn);
  *node = (void *)(uintptr_t)(g->n + 1); /* a node: its index + 1 */
  g->n++;
  return 0;
}
static int hg_inst(void **out, void *graph, unsigned long long fl) {
  (void)fl;
  hgraph_t *g = (hgraph_t *)graph;
  if (hg_failing(2)) return 999; /* CUDA_ERROR_UNKNOWN */
  __atomic_fetch_add(&hg_counts[2], 1, __ATOMIC_RELAXED);
  hgraph_t *x = calloc(1, sizeof(*x));
  if (!x) return 2;
  x->is_exec = 1;
  x->n = x->cap = g->n;
  x->nodes = malloc((g->n ? g->n : 1) * sizeof(hnode_t));
  if (!x->nodes) { free(x); return 2; }
  memcpy(x->nodes, g->nodes, g->n * sizeof(hnode_t));
  __atomic_fetch_add(&hg_alive, 1, __ATOMIC_RELAXED);
  *out = x;
  return 0;
}
static int hg_launch(void *exec, void *st) {
  hgraph_t *x = (hgraph_t *)exec;
  if (hg_failing(3)) return 999; /* CUDA_ERROR_UNKNOWN */
  __atomic_fetch_add(&hg_counts[3], 1, __ATOMIC_RELAXED);
  if (!x || !x->is_exec) return GW_CU_INVALID_VALUE;
  for (uint32_t k = 0; k < x->n; k++) {
    hnode_t *h = &x->nodes[k];
    void *kp[2] = {&h->p0, &h->p1};
    int rc = h_launch(h->func, h->dim[0], h->dim[1], h->dim[2], h->dim[3], h->dim[4], h->dim[5], h->dim[6], st,
                      h->np ? kp : NULL, NULL);
    if (rc) return rc;
  }
  return 0;
}
static int hg_set(void *exec, void *node, const gw_rpc_knode_t *kn) {
  hgraph_t *x = (hgraph_t *)exec;
  if (hg_failing(4)) return 999; /* CUDA_ERROR_UNKNOWN */
  __atomic_fetch_add(&hg_counts[4], 1, __ATOMIC_RELAXED);
  uintptr_t k = (uintptr_t)node;
  if (!x || !x->is_exec || k < 1 || k > x->n) return GW_CU_INVALID_VALUE;
  if (x->nodes[k - 1].func != kn->func) return GW_CU_INVALID_VALUE; /* (as the driver: same function) */
  hn_set(&x->nodes[k - 1], kn);
  return 0;
}
static int hg_free(hgraph_t *g, int exec, int which) {
  __atomic_fetch_add(&hg_counts[which], 1, __ATOMIC_RELAXED);
  if (!g || g->is_exec != exec) return GW_CU_INVALID_VALUE;
  free(g->nodes);
  free(g);
  __atomic_fetch_sub(&hg_alive, 1, __ATOMIC_RELAXED);
  return 0;
}
static int hg_exec_destroy(void *x) { return hg_free((hgraph_t *)x, 1, 5); }
static int hg_destroy(void *g) { return hg_free((hgraph_t *)g, 0, 6); }

void gw_rpc_graph_host_fns(gw_rpc_graph_fns_t *out) {
  out->create = (void *)hg_create;
  out->add_kernel = (void *)hg_add;
  out->instantiate = (void *)hg_inst;
  out->launch = (void *)hg_launch;
  out->set_params = (void *)hg_set;
  out->exec_destroy = (void *)hg_exec_destroy;
  out->destroy = (void *)hg_destroy;
}
uint64_t gw_rpc_graph_host_count(int which) {
  return (which >= 0 && which < 7) ? __atomic_load_n(&hg_counts[which], __ATOMIC_RELAXED) : 0;
}
int64_t gw_rpc_graph_host_alive(void) { return __atomic_load_n(&hg_alive, __ATOMIC_RELAXED); }

void *gw_rpc_host_fn(int which) {
  switch (which) {
    case GW_RPC_LAUNCH: return (void *)h_launch;
    case GW_RPC_MEMSET8: return (void *)h_memset8;
    case GW_RPC_MEMSET16: return (void *)h_memset16;
    case GW_RPC_MEMSET32: return (void *)h_memset32;
    case GW_RPC_DTOD: return (void *)h_dtod;
    case GW_RPC_EVREC: return (void *)h_evrec;
    case GW_RPC_WAITEV: return (void *)h_waitev;
    case GW_RPC_DTOH_ASYNC: return (void *)h_dtoh;
    case GW_RPC_STREAM_SYNC: return (void *)h_ssync;
    case GW_RPC_CTX_SYNC: return (void *)h_csync;
  }
  return NULL;
}

uint64_t gw_rpc_host_log_n(void) { return __atomic_load_n(&host_log_n, __ATOMIC_RELAXED); }
uint64_t gw_rpc_host_log(uint64_t i, int field) {
  return (field >= 0 && field < 3) ? host_log[i % 4096][field] : 0;
}

uint64_t gw_rpc_host_last(int i) { return (i >= 0 && i < 3) ? host_last[i] : 0; }

uint64_t gw_rpc_host_count(int which) {
  if (which < 0 || which >= GW_RPC_NCALLS) return 0;
  return __atomic_load_n(&host_counts[which], __ATOMIC_RELAXED);
}

/* ---- the client's fast sync stub */
typedef int (*gw_rpc_call_fn)(void *conn, uint32_t tag, const void *sbuf, size_t slen, uint32_t rtag,
                              void *rbuf, size_t rcap, int64_t timeout_ns, size_t *rlen);

/* a configuration the stub cannot use: nothing is sent (its -22 is also a transport status,
 * UCS_ERR_UNSUPPORTED, so callers test this, not the return value, to know the seq is unused) */
static int fsync_bad(const gw_rpc_fsync_t *f) {
  return !f->call || !f->conn || (f->len != 24 && f->len != 32) || f->rep_cap < 29;
}

static int fsync_core(gw_rpc_fsync_t *f, uint32_t seq, uint32_t push_done, uint64_t arg) {
  if (fsync_bad(f)) return -22;
  memcpy(f->frame + 4, &seq, 4);
  if (f->len == 32) memcpy(f->frame + 24, &arg, 8);
  f->rlen = 0;
  int st = ((gw_rpc_call_fn)f->call)(f->conn, f->req_tag, f->frame, f->len, f->rep_tag, f->rep, f->rep_cap,
                                     f->timeout_ns, &f->rlen);
  if (st) return st < 0 ? st : -st;
  /* the plain answer: header (magic 0x5747, version, flags 0, seq) | status 0 | pushes |
   * CUresult 0 | report byte 0 */
  const uint8_t *r = f->rep;
  uint32_t rseq, status, pushes, res;
  if (f->rlen < 29) return 1;
  memcpy(&rseq, r + 4, 4);
  memcpy(&status, r + 16, 4);
  memcpy(&pushes, r + 20, 4);
  memcpy(&res, r + 24, 4);
  if (r[0] != 0x47 || r[1] != 0x57 || r[3] != 0 || rseq != seq || status || pushes != push_done || res || r[28])
    return 1;
  return 0;
}

int gw_rpc_fsync(gw_rpc_fsync_t *f, uint32_t seq, uint32_t push_done, uint64_t arg) {
  int bad = fsync_bad(f);
  int st = fsync_core(f, seq, push_done, arg);
  if (f->seqp && !bad) __atomic_store_n(f->seqp, seq + 1, __ATOMIC_RELEASE); /* the seq is used, sent or not */
  return st;
}

struct gw_rpc_wire {
  pthread_mutex_t mu;
  uint32_t *seqp;     /* own_seq, or the flush timer's seq cell */
  uint32_t own_seq;
  uint32_t push_done;
  uint64_t call_seq;
  uint64_t nsync;     /* fast sync calls made */
  uint64_t nsync_seen;
  int busy;
  int dead;
  uint64_t owner;     /* the Python-side holder's thread (pthread_self), 0: none. Written under
                       * the lock; unlock and release are no-ops for any other thread, so
                       * Python may release in a finally/except that a KeyboardInterrupt
                       * (raised as a C call returns) reaches with or without the lock */
};

static inline uint64_t wire_self(void) { return (uint64_t)pthread_self(); }
static inline void wire_own(gw_rpc_wire_t *w) { __atomic_store_n(&w->owner, wire_self(), __ATOMIC_RELAXED); }
/* 1 (and the owner cleared) when this thread holds the lock for Python */
static inline int wire_disown(gw_rpc_wire_t *w) {
  if (__atomic_load_n(&w->owner, __ATOMIC_RELAXED) != wire_self()) return 0;
  __atomic_store_n(&w->owner, 0, __ATOMIC_RELAXED);
  return 1;
}

gw_rpc_wire_t *gw_rpc_wire_new(void) {
  gw_rpc_wire_t *w = calloc(1, sizeof *w);
  if (!w) return NULL;
  pthread_mutex_init(&w->mu, NULL);
  w->seqp = &w->own_seq;
  return w;
}

void gw_rpc_wire_free(gw_rpc_wire_t *w) {
  if (!w) return;
  pthread_mutex_destroy(&w->mu);
  free(w);
}

uint32_t *gw_rpc_wire_seqp(gw_rpc_wire_t *w) { return w->seqp; }
uint32_t *gw_rpc_wire_push_donep(gw_rpc_wire_t *w) { return &w->push_done; }
uint64_t *gw_rpc_wire_call_seqp(gw_rpc_wire_t *w) { return &w->call_seq; }

void gw_rpc_wire_use_seq_cell(gw_rpc_wire_t *w, uint32_t *cell) {
  pthread_mutex_lock(&w->mu);
  uint32_t *c = cell ? cell : &w->own_seq;
  __atomic_store_n(c, __atomic_load_n(w->seqp, __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
  w->seqp = c;
  pthread_mutex_unlock(&w->mu);
}

void gw_rpc_wire_lock(gw_rpc_wire_t *w) {
  pthread_mutex_lock(&w->mu);
  wire_own(w);
}
void gw_rpc_wire_unlock(gw_rpc_wire_t *w) {
  if (wire_disown(w)) pthread_mutex_unlock(&w->mu);
}

void gw_rpc_wire_release(gw_rpc_wire_t *w, int busy) {
  if (!wire_disown(w)) return;
  w->busy = busy;
  pthread_mutex_unlock(&w->mu);
}

int gw_rpc_wire_open(gw_rpc_wire_t *w, gw_rpc_timer_t *t) {
  pthread_mutex_lock(&w->mu);
  w->busy = 1;
  if (t) gw_rpc_timer_arm(t, __atomic_load_n(w->seqp, __ATOMIC_ACQUIRE));
  int synced = w->nsync != w->nsync_seen;
  w->nsync_seen = w->nsync;
  pthread_mutex_unlock(&w->mu);
  return synced;
}

void gw_rpc_wire_kill(gw_rpc_wire_t *w) {
  __atomic_store_n(&w->dead, 1, __ATOMIC_RELEASE); /* no lock: the holder of it may call this */
}

typedef int (*gw_rpc_send_fn)(void *conn, uint32_t tag, const void *hdr, size_t hlen, const void *buf,
                              size_t len, void **out);
typedef int (*gw_rpc_wait_fn)(void *worker, void *req, int64_t timeout_ns);
typedef void (*gw_rpc_release_fn)(void *worker, void *req);

int gw_rpc_flush(gw_rpc_flusher_t *fl, gw_rpc_wire_t *w, uint32_t cur, uint32_t len, uint32_t ncalls,
                 int busy_after, int *sent) {
  *sent = 0;
  if (!fl->send || !fl->conn || !fl->nframes || fl->nframes > GW_RPC_FLUSH_FRAMES || cur >= fl->nframes ||
      len < GW_HDR || !fl->frame[cur])
    return -22;
  pthread_mutex_lock(&w->mu);
  if (fl->req[cur]) { /* (never, if the caller only builds in a freed buffer): not while in flight */
    void *r0 = fl->req[cur];
    fl->req[cur] = NULL;
    int st0 = ((gw_rpc_wait_fn)fl->wait)(fl->worker, r0, fl->timeout_ns);
    ((gw_rpc_release_fn)fl->release)(fl->worker, r0);
    if (st0) {
      pthread_mutex_unlock(&w->mu);
      return st0 < 0 ? st0 : -st0;
    }
  }
  uint8_t *p = fl->frame[cur];
  uint32_t seq = *w->seqp;
  wr_hdr(p, 0, seq, ncalls, len - GW_HDR);
  void *req = NULL;
  int st = ((gw_rpc_send_fn)fl->send)(fl->conn, fl->req_tag, NULL, 0, p, len, &req);
  if (st < 0) {
    pthread_mutex_unlock(&w->mu);
    return st;
  }
  *sent = 1;
  __atomic_store_n(w->seqp, seq + 1, __ATOMIC_RELEASE);
  w->call_seq += ncalls;
  fl->req[cur] = req;
  uint32_t nxt = (cur + 1) % fl->nframes;
  st = 0;
  if (fl->req[nxt]) {
    void *r = fl->req[nxt];
    fl->req[nxt] = NULL;
    st = ((gw_rpc_wait_fn)fl->wait)(fl->worker, r, fl->timeout_ns);
    ((gw_rpc_release_fn)fl->release)(fl->worker, r);
  }
  w->busy = busy_after;
  pthread_mutex_unlock(&w->mu);
  if (st) return st < 0 ? st : -st;
  return (int)nxt;
}

int gw_rpc_flusher_wait(gw_rpc_flusher_t *fl, uint32_t i, int64_t timeout_ns) {
  if (i >= fl->nframes || i >= GW_RPC_FLUSH_FRAMES || !fl->req[i]) return 0;
  void *r = fl->req[i];
  fl->req[i] = NULL;
  int st = ((gw_rpc_wait_fn)fl->wait)(fl->worker, r, timeout_ns);
  ((gw_rpc_release_fn)fl->release)(fl->worker, r);
  return st < 0 ? st : -st;
}

void gw_rpc_flusher_drain(gw_rpc_flusher_t *fl, int64_t timeout_ns) {
  for (uint32_t i = 0; i < fl->nframes && i < GW_RPC_FLUSH_FRAMES; i++) {
    void *r = fl->req[i];
    if (!r) continue;
    fl->req[i] = NULL;
    ((gw_rpc_wait_fn)fl->wait)(fl->worker, r, timeout_ns);
    ((gw_rpc_release_fn)fl->release)(fl->worker, r);
  }
}

int gw_rpc_fsync_w(gw_rpc_fsync_t *f, uint64_t arg) {
  gw_rpc_wire_t *w = f->wire;
  if (!w) return -22;
  pthread_mutex_lock(&w->mu);
  if (w->busy | __atomic_load_n(&w->dead, __ATOMIC_ACQUIRE)) {
    pthread_mutex_unlock(&w->mu);
    return 2;
  }
  wire_own(w); /* (held on for Python unless the answer is plain) */
  uint32_t seq = *w->seqp;
  int bad = fsync_bad(f);
  int st = fsync_core(f, seq, w->push_done, arg);
  if (!bad) {
    __atomic_store_n(w->seqp, seq + 1, __ATOMIC_RELEASE); /* the seq is used, sent or not */
    w->call_seq++;
    w->nsync++;
  }
  if (st == 0) {
    wire_disown(w);
    pthread_mutex_unlock(&w->mu);
  }
  return st; /* 1 or negative: the caller reads the reply, then gw_rpc_wire_unlock */
}

int gw_rpc_bsync_w(gw_rpc_fsync_t *f, uint8_t *frame, uint32_t pos, uint32_t cap, uint32_t ncalls,
                   uint64_t arg, uint32_t ntail, int busy_after) {
  gw_rpc_wire_t *w = f->wire;
  if (!w || !frame || fsync_bad(f)) return 3;
  uint32_t rl = f->len - GW_HDR;
  if (pos < GW_HDR || (uint64_t)pos + rl > cap || ncalls == 0xFFFFFFFFu) return 3;
  pthread_mutex_lock(&w->mu);
  if (__atomic_load_n(&w->dead, __ATOMIC_ACQUIRE)) {
    pthread_mutex_unlock(&w->mu);
    return 2;
  }
  wire_own(w); /* (held on for Python unless the answer is plain) */
  uint32_t seq = *w->seqp, end = pos + rl, nc = ncalls + 1;
  memcpy(frame + pos, f->frame + GW_HDR, rl);
  if (f->len == 32) memcpy(frame + pos + 8, &arg, 8);
  wr_hdr(frame, GW_F_SYNC, seq, nc, end - GW_HDR);
  f->rlen = 0;
  int st = ((gw_rpc_call_fn)f->call)(f->conn, f->req_tag, frame, end, f->rep_tag, f->rep, f->rep_cap,
                                     f->timeout_ns, &f->rlen);
  __atomic_store_n(w->seqp, seq + 1, __ATOMIC_RELEASE); /* the seq is used, sent or not */
  w->call_seq += nc;
  if (st) return st < 0 ? st : -st;
  /* the plain answer: header (magic, version, flags 0, seq) | status 0 | pushes | the tail's
   * results | CUresult 0 | report byte 0 */
  const uint8_t *r = f->rep;
  size_t n = f->rlen, off = 24;
  uint32_t rseq, status, pushes, res, m;
  if (n < off) return 1;
  memcpy(&rseq, r + 4, 4);
  memcpy(&status, r + 16, 4);
  memcpy(&pushes, r + 20, 4);
  if (r[0] != 0x47 || r[1] != 0x57 || r[3] != 0 || rseq != seq || status || pushes != w->push_done) return 1;
  for (uint32_t i = 0; i < ntail; i++) {
    if (off + 4 > n) return 1;
    memcpy(&m, r + off, 4);
    if (m > n - off - 4) return 1;
    off += 4 + (size_t)m;
  }
  if (off + 5 > n) return 1;
  memcpy(&res, r + off, 4);
  if (res || r[off + 4]) return 1;
  w->busy = busy_after;
  wire_disown(w);
  pthread_mutex_unlock(&w->mu);
  return 0;
}

/* ------------------------------------------------------------------ bulk copies (gw_rpc_bulk_*) */

typedef int (*b_recv_fn)(void *, void *, uint32_t, uint32_t, void *, size_t, void **);
typedef int (*b_send_fn)(void *, uint32_t, const void *, size_t, const void *, size_t, void **);
typedef int (*b_wait_fn)(void *, void *, int64_t);
typedef int (*b_test_fn)(void *);
typedef void (*b_info_fn)(void *, int *, size_t *, uint32_t *, uint32_t *, uint32_t *);
typedef void (*b_release_fn)(void *, void *);
typedef int (*b_progress_fn)(void *);
typedef int (*b_htod_fn)(uint64_t, const void *, size_t, void *);
typedef int (*b_dtoh_fn)(void *, uint64_t, size_t, void *);
typedef int (*b_evrec_fn)(void *, void *);
typedef int (*b_evquery_fn)(void *);

#define B_TAG_MASK 0xFFFFFFu
#define B_NOT_READY 600 /* CUDA_ERROR_NOT_READY */
#define B_TRUNCATED (-1005) /* the transport's GW_ERR_TRUNCATED: a message longer than the receive */
#define B_NCOPY (2 * GW_RPC_BULK_MAXSLOTS)

enum { SL_FREE = 0, SL_RECV, SL_D2HQ, SL_SEND };

typedef struct {
  int state;
  int ev_used;     /* a copy's event was recorded on this slot: wait for it before reuse */
  int empty;       /* SL_D2HQ: send an empty message (the copy failed) */
  void *req;       /* SL_RECV: the posted receive; SL_SEND: the send */
  uint64_t dptr;   /* SL_RECV: destination */
  uint64_t len;    /* expected / copied bytes */
  void *stream;
  uint32_t tag;    /* SL_D2HQ: the client's route tag */
  uint32_t copy;   /* index into copies[] */
  int lane;        /* the message's bulk lane, -1: the session's connection */
} bslot_t;

typedef struct { /* one copy record, for its late failure */
  uint32_t seq, pos;
  uint16_t id;
  int failed;
  uint64_t ran_at; /* v->ran + pos when it ran */
  uint8_t fixed[24];
} bcopy_t;

struct gw_rpc_bulk {
  gw_rpc_bulk_cfg_t c;
  bslot_t sl[GW_RPC_BULK_MAXSLOTS];
  uint32_t ring;                       /* the next slot to take (the least recently taken) */
  int dq[GW_RPC_BULK_MAXSLOTS];        /* slots in SL_D2HQ, oldest first */
  uint32_t dq_head, dq_n;
  bcopy_t copies[B_NCOPY];
  uint32_t ncopy;                      /* copies started (index mod B_NCOPY) */
  gw_rpc_late_t late[GW_RPC_BULK_MAXLATE];
  int nlate;
  uint32_t dropped;
  uint64_t ran_pass;                   /* late[].back is set (at a pass) */
  uint64_t pend_bytes;                 /* bytes of the SL_RECV slots */
  uint64_t stat[GW_RPC_BS_N];
  /* phase times (GW_RPC_BS_PH0..), while the server traces: tron is set for one handler call */
  int tron;
  int ph;        /* the phase the time now goes to */
  int evph;      /* b_ev_wait's phase (the frame's direction) */
  int64_t ph_t;  /* when the time since went to ph */
  int64_t h_t0;  /* the handler call's start */
  int nl;                               /* bulk lanes (0: none) */
  uint64_t lane_min;
  void *lconn[GW_RPC_MAXLANES], *lworker[GW_RPC_MAXLANES];
};

/* the lane of chunk j of a payload of n bytes tagged tag (-1: the session's connection) */
static inline int b_lane(const gw_rpc_bulk_t *b, uint32_t tag, uint64_t j, uint64_t n) {
  return (b->nl && n >= b->lane_min) ? (int)((tag + j) % (uint64_t)b->nl) : -1;
}
static inline void *b_wk(const gw_rpc_bulk_t *b, int lane) { return lane < 0 ? b->c.worker : b->lworker[lane]; }
static inline void *b_cn(const gw_rpc_bulk_t *b, int lane) { return lane < 0 ? b->c.conn : b->lconn[lane]; }

int gw_rpc_bulk_set_lanes(gw_rpc_bulk_t *b, int n, void **conns, void **workers, uint64_t lane_min) {
  if (!b || n < 0 || n > GW_RPC_MAXLANES || (n && (!conns || !workers))) return -1;
  for (int i = 0; i < n; i++)
    if (!conns[i] || !workers[i]) return -1;
  for (int i = 0; i < n; i++) {
    b->lconn[i] = conns[i];
    b->lworker[i] = workers[i];
  }
  b->nl = n;
  b->lane_min = lane_min;
  return 0;
}

/* entering / leaving a phase (nested: the outer one's exclusive time pauses) */
typedef struct { int prev, p; int64_t t0; } bph_t;
#define B_PHX(p) (GW_RPC_BS_PH0 + 3 * (p))
static inline bph_t ph_in(gw_rpc_bulk_t *b, int p) {
  bph_t r = {-1, p, 0};
  if (!b->tron) return r;
  int64_t t = tr_now();
  b->stat[B_PHX(b->ph)] += (uint64_t)(t - b->ph_t);
  b->stat[B_PHX(p) + 1]++;
  r.prev = b->ph;
  r.t0 = t;
  b->ph = p;
  b->ph_t = t;
  return r;
}
static inline void ph_out(gw_rpc_bulk_t *b, bph_t r) {
  if (r.prev < 0 || !b->tron) return;
  int64_t t = tr_now();
  b->stat[B_PHX(r.p)] += (uint64_t)(t - b->ph_t);
  b->stat[B_PHX(r.p) + 2] += (uint64_t)(t - r.t0);
  b->ph = r.prev;
  b->ph_t = t;
}
/* the handler call's timing ends (before it returns, or hands the frame to gw_rpc_serve_handler) */
static inline void ph_stop(gw_rpc_bulk_t *b) {
  if (!b->tron) return;
  int64_t t = tr_now();
  b->stat[B_PHX(b->ph)] += (uint64_t)(t - b->ph_t);
  b->stat[GW_RPC_BS_HANDLER_NS] += (uint64_t)(t - b->h_t0);
  b->stat[B_PHX(GW_RPC_BPH_OTHER) + 2] += (uint64_t)(t - b->h_t0); /* (OTHER: the whole call) */
  b->tron = 0;
}

static void b_fail(gw_rpc_bulk_t *b, bcopy_t *cp, int res, const char *fmt, ...) {
  if (cp->failed) return; /* one failure per copy (its later chunks are only drained) */
  cp->failed = 1;
  if (b->nlate >= GW_RPC_BULK_MAXLATE) {
    b->dropped++;
    return;
  }
  gw_rpc_late_t *l = &b->late[b->nlate++];
  memset(l, 0, sizeof(*l));
  l->res = res;
  l->seq = cp->seq;
  l->pos = cp->pos;
  l->id = cp->id;
  l->back = cp->ran_at; /* becomes the distance at the pass */
  memcpy(l->fixed, cp->fixed, 24);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(l->msg, sizeof(l->msg), fmt, ap);
  va_end(ap);
}

static uint64_t b_msg(const gw_rpc_bulk_t *b, uint64_t n) { return (b->c.chunk && n > b->c.chunk) ? b->c.chunk : n; }
static uint64_t b_nchunks(const gw_rpc_bulk_t *b, uint64_t n) {
  return (b->c.chunk && n > b->c.chunk) ? (n + b->c.chunk - 1) / b->c.chunk : 1;
}

static void b_poll(gw_rpc_bulk_t *b);

/* wait for a slot's event while driving the transport (and settling payloads that came in) */
static int b_ev_wait(gw_rpc_bulk_t *b, int k) {
  bslot_t *s = &b->sl[k];
  if (!s->ev_used) return 0;
  int rc;
  bph_t ph = ph_in(b, b->evph);
  while ((rc = ((b_evquery_fn)b->c.evquery)(b->c.ev[k])) == B_NOT_READY) {
    ((b_progress_fn)b->c.progress)(b->c.worker);
    b_poll(b);
  }
  ph_out(b, ph);
  s->ev_used = 0;
  return rc;
}

/* an H2D slot: wait for its payload, queue its copy to the device */
static void b_settle(gw_rpc_bulk_t *b, int k) {
  bslot_t *s = &b->sl[k];
  bcopy_t *cp = &b->copies[s->copy];
  bph_t ph = ph_in(b, GW_RPC_BPH_RECV_WAIT);
  int rc = ((b_wait_fn)b->c.wait)(b_wk(b, s->lane), s->req, b->c.timeout_ns);
  ph_out(b, ph);
  int st = 0;
  size_t got = 0;
  uint32_t a, t, h;
  ((b_info_fn)b->c.info)(s->req, &st, &got, &a, &t, &h);
  ((b_release_fn)b->c.release)(b_wk(b, s->lane), s->req); /* cancels it if it is still posted */
  s->req = NULL;
  s->state = SL_FREE;
  b->stat[GW_RPC_BS_PENDING]--;
  b->pend_bytes -= s->len;
  if (cp->failed) return;
  if (rc == B_TRUNCATED || (!rc && st == B_TRUNCATED)) { /* (gw_wait returns the request's status) */
    b_fail(b, cp, GW_CU_INVALID_VALUE, "bulk payload chunk longer than the expected %llu B", (unsigned long long)s->len);
    return;
  }
  if (rc || st) {
    b_fail(b, cp, GW_CU_INVALID_VALUE, "bulk payload chunk of %llu B at 0x%llx: not received (transport status %d)",
           (unsigned long long)s->len, (unsigned long long)s->dptr, rc ? rc : st);
    return;
  }
  if (got != s->len) {
    b_fail(b, cp, GW_CU_INVALID_VALUE, "bulk payload chunk of %llu B, expected %llu", (unsigned long long)got,
           (unsigned long long)s->len);
    return;
  }
  ph = ph_in(b, GW_RPC_BPH_HTOD);
  rc = ((b_htod_fn)b->c.htod)(s->dptr, b->c.slot[k], (size_t)s->len, s->stream);
  ph_out(b, ph);
  if (rc) {
    b_fail(b, cp, rc, "cuMemcpyHtoDAsync (%llu B from staging)", (unsigned long long)s->len);
    return;
  }
  ph = ph_in(b, GW_RPC_BPH_EVREC_H2D);
  rc = ((b_evrec_fn)b->c.evrec)(b->c.ev[k], s->stream);
  ph_out(b, ph);
  if (rc) {
    /* (the context is broken: the driver's next call on it fails as well) */
    b_fail(b, cp, rc, "cuEventRecord (after the staging copy)");
    return;
  }
  s->ev_used = 1;
}

static void b_send(gw_rpc_bulk_t *b, int k) {
  bslot_t *s = &b->sl[k];
  void *req = NULL;
  bph_t ph = ph_in(b, GW_RPC_BPH_SEND_POST);
  int rc = ((b_send_fn)b->c.send)(b_cn(b, s->lane), s->tag, NULL, 0, b->c.slot[k], s->empty ? 0 : (size_t)s->len,
                                  &req);
  ph_out(b, ph);
  if (rc < 0 || !req) { /* the connection is gone: the serve loop sees it next */
    s->state = SL_FREE;
    return;
  }
  s->req = req;
  s->state = SL_SEND;
}

/* send the oldest queued D2H chunk (its copy waited for) */
static void b_dq_pop(gw_rpc_bulk_t *b) {
  int k = b->dq[b->dq_head];
  b->dq_head = (b->dq_head + 1) % GW_RPC_BULK_MAXSLOTS;
  b->dq_n--;
  bslot_t *s = &b->sl[k];
  if (!s->empty) {
    int rc = b_ev_wait(b, k);
    if (rc) {
      b_fail(b, &b->copies[s->copy], rc, "cuEventQuery (D2H staging copy)");
      s->empty = 1;
    } else if (b->copies[s->copy].failed) {
      s->empty = 1;
    }
  }
  b_send(b, k);
}

/* the next slot of the ring, free for a new use: what it held before is finished first */
static int b_take(gw_rpc_bulk_t *b, int *kout) {
  int k = (int)b->ring;
  b->ring = (b->ring + 1) % b->c.nslots;
  bslot_t *s = &b->sl[k];
  if (s->state == SL_RECV) b_settle(b, k); /* the oldest pending payload */
  if (s->state == SL_D2HQ)
    while (s->state == SL_D2HQ) b_dq_pop(b); /* it is the oldest queued chunk */
  if (s->state == SL_SEND) {
    bph_t ph = ph_in(b, GW_RPC_BPH_SEND_WAIT);
    ((b_wait_fn)b->c.wait)(b_wk(b, s->lane), s->req, b->c.timeout_ns);
    ph_out(b, ph);
    ((b_release_fn)b->c.release)(b_wk(b, s->lane), s->req);
    s->req = NULL;
    s->state = SL_FREE;
  }
  *kout = k;
  return b_ev_wait(b, k);
}

/* the pending H2D payloads that are in, oldest first, up to the first still on its way:
 * their device copies are queued now (a slot settles only after every older one) */
static void b_poll(gw_rpc_bulk_t *b) {
  if (!b->stat[GW_RPC_BS_PENDING]) return;
  for (uint32_t j = 0; j < b->c.nslots; j++) {
    int k = (int)((b->ring + j) % b->c.nslots);
    bslot_t *s = &b->sl[k];
    if (s->state != SL_RECV) continue;
    if (!((b_test_fn)b->c.test)(s->req)) return;
    b_settle(b, k);
  }
}

/* the oldest pending H2D payload: received and queued (0: none was pending) */
static int b_settle_oldest(gw_rpc_bulk_t *b) {
  for (uint32_t j = 0; j < b->c.nslots; j++) {
    int k = (int)((b->ring + j) % b->c.nslots);
    if (b->sl[k].state == SL_RECV) {
      b_settle(b, k);
      return 1;
    }
  }
  return 0;
}

/* every pending H2D payload: received and queued, in order */
static void b_settle_all(gw_rpc_bulk_t *b) {
  if (!b->stat[GW_RPC_BS_PENDING]) return; /* (the common frame: nothing pending) */
  for (uint32_t j = 0; j < b->c.nslots; j++) {
    int k = (int)((b->ring + j) % b->c.nslots);
    if (b->sl[k].state == SL_RECV) b_settle(b, k);
  }
}

static bcopy_t *b_copy(gw_rpc_bulk_t *b, const uint8_t *fr, const gw_rpc_rec_t *r, uint32_t seq, uint32_t i) {
  uint32_t ci = b->ncopy++ % B_NCOPY;
  bcopy_t *cp = &b->copies[ci];
  cp->seq = seq;
  cp->pos = i;
  cp->id = r->id;
  cp->failed = 0;
  cp->ran_at = b->c.srv->ran + i;
  memcpy(cp->fixed, fr + r->fixed, 24);
  return cp;
}

static int b_pass(gw_rpc_bulk_t *b, const uint8_t *fr, size_t len, int64_t t_in) {
  gw_rpc_srv_t *v = b->c.srv;
  for (int i = 0; i < b->nlate; i++)
    if (b->ran_pass <= (uint64_t)i) b->late[i].back = v->ran - b->late[i].back;
  b->ran_pass = (uint64_t)b->nlate;
  v->resume = 0;
  v->tail_n = 0;
  return srv_pass(v, tr_start(v, fr, len, t_in)); /* GW_SERVE_PASS (counted, traced) */
}

/* 1: an H2D frame this handler runs, 2: a D2H frame, 0: not one (then it goes on as before).
 * Such a frame is [hot calls gw_rpc_serve_handler runs (launches, memsets, ...)] followed by
 * [copies of one kind]; *first is the index of the first copy. */
static int b_classify(gw_rpc_bulk_t *b, const uint8_t *fr, size_t len, uint64_t *nchunks, uint32_t *first) {
  gw_rpc_srv_t *v = b->c.srv;
  if (!v->enabled || !v->s || len < GW_HDR) return 0;
  uint8_t flags = fr[3];
  uint32_t ncalls = rd32(fr + 8), blen = rd32(fr + 12);
  if (rd16(fr) != GW_MAGIC || fr[2] != GW_VERSION || flags || blen != len - GW_HDR || ncalls == 0 ||
      ncalls > v->nrecs)
    return 0; /* sync, hello and bye frames: not here */
  /* a glance at the record headers: is there a copy at all (the common frame has none) */
  int any = 0;
  size_t off = GW_HDR;
  for (uint32_t i = 0; i < ncalls && off + 8 <= len; i++) {
    uint16_t id = rd16(fr + off);
    uint32_t rl = rd32(fr + off + 4);
    if (id == b->c.id_htod || id == b->c.id_dtoh) {
      any = 1;
      break;
    }
    if (rl < 8 || rl > len - off) return 0;
    off += rl;
  }
  if (!any) return 0;
  if (gw_rpc_scan(fr, GW_HDR, len, ncalls, 0, v->desc, v->ndesc, v->recs, NULL, 0)) return 0;
  char err[8];
  uint64_t total = 0;
  int big = 0, ncopy = 0;
  uint16_t id0 = 0;
  *first = ncalls;
  for (uint32_t i = 0; i < ncalls; i++) {
    const gw_rpc_rec_t *r = &v->recs[i];
    if (*first == ncalls) {
      if (r->id != b->c.id_htod && r->id != b->c.id_dtoh) {
        int k = srv_kind(v, r);
        if (k < 0 || k >= GW_RPC_NHOT) return 0; /* only hot calls before the copies */
        continue;
      }
      *first = i;
      id0 = r->id;
    }
    const uint8_t *f = fr + r->fixed;
    uint64_t p = rd64(f), n = rd64(f + 8);
    void *st;
    if (r->id != id0 || n == 0 || b_msg(b, n) > b->c.slot_size) return 0;
    if (!amap_ok(&v->s->allocs, p, n) || tr_stream(v->s, rd64(f + 16), &st, err, sizeof(err))) return 0;
    if (id0 == b->c.id_htod) {
      if (r->nvar != 1 || r->var_off[0] != 0xFFFFFFFFu || r->var_bulk[0] != n || n > b->c.htod_max) return 0;
    } else {
      if (r->nroute != 1 || !r->route[0]) return 0;
      if (n >= b->c.dtoh_min) big = 1;
    }
    total += b_nchunks(b, n);
    ncopy++;
  }
  if (!ncopy) return 0;
  /* several H2D copies must fit the ring together (a single one may cycle through it) */
  if (id0 == b->c.id_htod && ncopy > 1 && total > b->c.nslots) return 0;
  if (id0 == b->c.id_dtoh && !big) return 0; /* small pushes: gw_rpc_serve_handler's way */
  *nchunks = total;
  return id0 == b->c.id_htod ? 1 : 2;
}

/* record i of an async copy frame: its device pointer, size and stream (checked by b_classify),
 * its copy entry and the message size its chunks travel in */
static bcopy_t *b_rec(gw_rpc_bulk_t *b, const uint8_t *fr, uint32_t seq, uint32_t i, uint64_t *ptr, uint64_t *n,
                      void **st, uint64_t *m) {
  gw_rpc_srv_t *v = b->c.srv;
  const gw_rpc_rec_t *r = &v->recs[i];
  const uint8_t *f = fr + r->fixed;
  char err[8];
  *ptr = rd64(f);
  *n = rd64(f + 8);
  *st = NULL;
  tr_stream(v->s, rd64(f + 16), st, err, sizeof(err));
  *m = b_msg(b, *n);
  return b_copy(b, fr, r, seq, i);
}

static void b_run_h2d(gw_rpc_bulk_t *b, const uint8_t *fr, uint32_t seq, uint32_t from, uint32_t ncalls) {
  b->evph = GW_RPC_BPH_EVWAIT_H2D;
  for (uint32_t i = from; i < ncalls; i++) {
    uint64_t dst, n, m;
    void *st;
    bcopy_t *cp = b_rec(b, fr, seq, i, &dst, &n, &st, &m);
    uint32_t ci = (uint32_t)(cp - b->copies), tag = b->c.srv->recs[i].var_len[0];
    uint64_t j = 0;
    for (uint64_t off = 0; off < n; off += m, j++) {
      uint64_t ln = n - off < m ? n - off : m;
      int k;
      int rc = b_take(b, &k);
      if (rc) b_fail(b, cp, rc, "cuEventQuery (staging slot)");
      bslot_t *s = &b->sl[k];
      void *req = NULL;
      /* at most `inflight` bytes posted: large messages keep fewer receives in flight */
      if (b->pend_bytes && b->pend_bytes + ln > b->c.inflight) {
        bph_t ph = ph_in(b, GW_RPC_BPH_INFLIGHT);
        while (b->pend_bytes && b->pend_bytes + ln > b->c.inflight && b_settle_oldest(b)) {
        }
        ph_out(b, ph);
      }
      /* posted even after a failure: the payload is on its way and must be taken */
      bph_t ph = ph_in(b, GW_RPC_BPH_RECV_POST);
      int lane = b_lane(b, tag, j, n);
      rc = ((b_recv_fn)b->c.recv)(b_wk(b, lane), b_cn(b, lane), tag, B_TAG_MASK, b->c.slot[k], (size_t)ln, &req);
      ph_out(b, ph);
      if (rc < 0 || !req) {
        b_fail(b, cp, GW_CU_INVALID_VALUE, "bulk payload: cannot post its receive (transport status %d)", rc);
        continue;
      }
      s->state = SL_RECV;
      s->req = req;
      s->lane = lane;
      s->dptr = dst + off;
      s->len = ln;
      s->stream = st;
      s->copy = ci;
      if (++b->stat[GW_RPC_BS_PENDING] > b->stat[GW_RPC_BS_MAXPEND]) b->stat[GW_RPC_BS_MAXPEND] = b->stat[GW_RPC_BS_PENDING];
      b->pend_bytes += ln;
    }
    b->stat[GW_RPC_BS_H2D]++;
  }
}

static void b_run_d2h(gw_rpc_bulk_t *b, const uint8_t *fr, uint32_t seq, uint32_t from, uint32_t ncalls) {
  b->evph = GW_RPC_BPH_EVWAIT_D2H;
  for (uint32_t i = from; i < ncalls; i++) {
    uint64_t src, n, m;
    void *st;
    bcopy_t *cp = b_rec(b, fr, seq, i, &src, &n, &st, &m);
    uint32_t ci = (uint32_t)(cp - b->copies);
    const gw_rpc_rec_t *r = &b->c.srv->recs[i];
    uint64_t j = 0;
    for (uint64_t off = 0; off < n; off += m, j++) {
      uint64_t ln = n - off < m ? n - off : m;
      int k;
      int rc = b_take(b, &k);
      if (rc) b_fail(b, cp, rc, "cuEventQuery (staging slot)");
      bslot_t *s = &b->sl[k];
      s->empty = cp->failed;
      if (!cp->failed) {
        bph_t ph = ph_in(b, GW_RPC_BPH_DTOH);
        rc = ((b_dtoh_fn)b->c.dtoh)(b->c.slot[k], src + off, (size_t)ln, st);
        ph_out(b, ph);
        if (!rc) {
          ph = ph_in(b, GW_RPC_BPH_EVREC_D2H);
          rc = ((b_evrec_fn)b->c.evrec)(b->c.ev[k], st);
          ph_out(b, ph);
          if (rc) {
            b_fail(b, cp, rc, "cuEventRecord (after the staging copy)");
            s->empty = 1;
          } else {
            s->ev_used = 1;
          }
        } else {
          b_fail(b, cp, rc, "cuMemcpyDtoHAsync");
          s->empty = 1;
        }
      }
      s->state = SL_D2HQ;
      s->len = ln;
      s->tag = r->route[0];
      s->lane = b_lane(b, s->tag, j, n);
      s->copy = ci;
      b->dq[(b->dq_head + b->dq_n) % GW_RPC_BULK_MAXSLOTS] = k;
      b->dq_n++;
      /* chunks whose copy is done go out now, in order */
      while (b->dq_n) {
        bslot_t *h = &b->sl[b->dq[b->dq_head]];
        if (!h->empty && h->ev_used &&
            ((b_evquery_fn)b->c.evquery)(b->c.ev[b->dq[b->dq_head]]) == B_NOT_READY)
          break;
        b_dq_pop(b);
      }
    }
    b->c.srv->pushes++;
    b->stat[GW_RPC_BS_D2H]++;
  }
  while (b->dq_n) b_dq_pop(b); /* every send is issued before the handler returns */
}

static int b_handler(gw_rpc_bulk_t *b, void *msg, size_t len, gw_rpc_msg_t *out, int maxout, int *nout,
                     int64_t t_in) {
  gw_rpc_srv_t *v = b->c.srv;
  const uint8_t *fr = (const uint8_t *)msg;
  *nout = 0;
  bph_t ph = ph_in(b, GW_RPC_BPH_PRESCAN);
  if (b->nlate) { /* Python takes the late failures first */
    b_settle_all(b);
    ph_out(b, ph);
    return b_pass(b, fr, len, t_in);
  }
  b_poll(b); /* payloads that came in while the serve loop waited: their copies start now */
  if (b->nlate || (v->seq_on && len >= GW_HDR && rd32(fr + 4) != v->next_seq)) { /* (out of order: Python refuses it) */
    b_settle_all(b);
    ph_out(b, ph);
    return b_pass(b, fr, len, t_in);
  }
  ph_out(b, ph);
  uint64_t need = 0;
  uint32_t first = 0;
  int kind = b_classify(b, fr, len, &need, &first);
  ph = ph_in(b, GW_RPC_BPH_PRESCAN);
  if (b->tron) b->stat[B_PHX(GW_RPC_BPH_PRESCAN) + 1]--; /* (its second part: once per call) */
  if (kind == 1 && first == 0) {
    /* the slots this frame takes: their pending payloads are settled first (so a failure
     * there is found before anything of this frame ran) */
    uint64_t upto = need < b->c.nslots ? need : b->c.nslots;
    for (uint64_t j = 0; j < upto; j++) {
      int k = (int)((b->ring + j) % b->c.nslots);
      if (b->sl[k].state == SL_RECV) {
        b_settle(b, k);
        b->stat[GW_RPC_BS_EARLY]++;
      }
    }
  } else {
    b_settle_all(b); /* later calls run after the pending H2D copies are queued */
  }
  if (b->nlate) {
    b_settle_all(b);
    ph_out(b, ph);
    return b_pass(b, fr, len, t_in);
  }
  ph_out(b, ph);
  if (!kind) {
    ph_stop(b); /* (the frame's own time is gw_rpc_serve_handler's) */
    return gw_rpc_serve_handler(v, msg, len, out, maxout, nout);
  }
  uint32_t seq = rd32(fr + 4), ncalls = rd32(fr + 8);
  v->resume = 0;
  v->tail_n = 0;
  gw_rpc_trace_t *tr = tr_start(v, fr, len, t_in);
  if (tr) tr->t_scan = tr_now();
  /* the hot calls before the copies, as gw_rpc_serve_handler runs them; a failure stops the
   * frame there and Python takes it from that record (its copies then run in Python) */
  for (uint32_t i = 0; i < first; i++) {
    const gw_rpc_rec_t *r = &v->recs[i];
    v->err[0] = 0;
    int rc = exec_one(v->s, fr, r, srv_kind(v, r), v->err, sizeof(v->err));
    if (tr && !tr->t_first) tr->t_first = tr_now();
    if (rc) {
      v->resume = 1;
      v->resume_at = i;
      v->resume_res = rc;
      v->ran += i;
      return srv_pass(v, tr); /* GW_SERVE_PASS */
    }
  }
  if (kind == 1)
    b_run_h2d(b, fr, seq, first, ncalls);
  else
    b_run_d2h(b, fr, seq, first, ncalls);
  v->ran += ncalls;
  v->frames++;
  v->next_seq = seq + 1;
  b->stat[GW_RPC_BS_FRAMES]++;
  if (tr) {
    int64_t t = tr_now();
    if (!tr->t_first) tr->t_first = t;
    tr->t_issued = t;
    tr->npush = kind == 2 ? ncalls - first : 0;
    tr->t_out = t;
  }
  return 1; /* GW_SERVE_NEXT (these frames are never sync frames: no reply) */
}

int gw_rpc_bulk_handler(void *arg, void *msg, size_t len, gw_rpc_msg_t *out, int maxout, int *nout) {
  gw_rpc_bulk_t *b = (gw_rpc_bulk_t *)arg;
  if (!b->c.srv->trace) return b_handler(b, msg, len, out, maxout, nout, 0);
  int64_t t_in = tr_now(); /* (frames it does not hand on are traced here) */
  b->tron = 1;
  b->ph = GW_RPC_BPH_OTHER;
  b->ph_t = b->h_t0 = t_in;
  b->stat[GW_RPC_BS_HANDLER_N]++;
  b->stat[B_PHX(GW_RPC_BPH_OTHER) + 1]++;
  int rc = b_handler(b, msg, len, out, maxout, nout, t_in);
  ph_stop(b);
  return rc;
}

uintptr_t gw_rpc_bulk_handler_addr(void) { return (uintptr_t)gw_rpc_bulk_handler; }

gw_rpc_bulk_t *gw_rpc_bulk_new(const gw_rpc_bulk_cfg_t *cfg) {
  if (!cfg || !cfg->srv || cfg->nslots < 2 || cfg->nslots > GW_RPC_BULK_MAXSLOTS || !cfg->slot_size ||
      (cfg->chunk && cfg->chunk > cfg->slot_size) || !cfg->recv || !cfg->send || !cfg->wait || !cfg->test || !cfg->info ||
      !cfg->release || !cfg->progress || !cfg->worker || !cfg->conn || !cfg->htod || !cfg->dtoh || !cfg->evrec ||
      !cfg->evquery)
    return NULL;
  for (uint32_t k = 0; k < cfg->nslots; k++)
    if (!cfg->slot[k]) return NULL;
  gw_rpc_bulk_t *b = (gw_rpc_bulk_t *)calloc(1, sizeof(*b));
  if (!b) return NULL;
  b->c = *cfg;
  for (uint32_t k = 0; k < GW_RPC_BULK_MAXSLOTS; k++) b->sl[k].lane = -1;
  return b;
}

void gw_rpc_bulk_free(gw_rpc_bulk_t *b) {
  if (!b) return;
  for (uint32_t k = 0; k < b->c.nslots; k++) {
    bslot_t *s = &b->sl[k];
    if (s->state == SL_RECV || s->state == SL_SEND) {
      if (s->state == SL_SEND) ((b_wait_fn)b->c.wait)(b_wk(b, s->lane), s->req, 2000000000LL);
      ((b_release_fn)b->c.release)(b_wk(b, s->lane), s->req); /* a posted receive is cancelled */
    }
    s->req = NULL;
    s->state = SL_FREE;
  }
  /* D2HQ slots exist only inside a handler call */
  free(b);
}

int gw_rpc_bulk_late(gw_rpc_bulk_t *b, gw_rpc_late_t *out, int cap, uint32_t *dropped) {
  int n = b->nlate < cap ? b->nlate : cap;
  gw_rpc_srv_t *v = b->c.srv;
  for (int i = 0; i < n; i++) {
    out[i] = b->late[i];
    if ((uint64_t)i >= b->ran_pass) out[i].back = v->ran - out[i].back; /* (taken without a pass) */
  }
  memmove(b->late, b->late + n, sizeof(gw_rpc_late_t) * (size_t)(b->nlate - n));
  b->nlate -= n;
  b->ran_pass = b->ran_pass > (uint64_t)n ? b->ran_pass - (uint64_t)n : 0;
  if (dropped) *dropped = b->dropped;
  b->dropped = 0;
  return n;
}

int gw_rpc_bulk_nlate(gw_rpc_bulk_t *b) { return b->nlate; }

uint64_t gw_rpc_bulk_stat(gw_rpc_bulk_t *b, int which) {
  return (which >= 0 && which < GW_RPC_BS_N) ? b->stat[which] : 0;
}

static int bh_htod(uint64_t d, const void *s, size_t n, void *st) {
  (void)st;
  memcpy((void *)(uintptr_t)d, s, n);
  return 0;
}
static int bh_dtoh(void *d, uint64_t s, size_t n, void *st) {
  (void)st;
  memcpy(d, (const void *)(uintptr_t)s, n);
  return 0;
}
static int bh_evrec(void *e, void *st) {
  (void)e; (void)st;
  return 0;
}
static int bh_evquery(void *e) {
  (void)e;
  return 0;
}

void *gw_rpc_bulk_host_fn(int which) {
  switch (which) {
  case 0: return (void *)bh_htod;
  case 1: return (void *)bh_dtoh;
  case 2: return (void *)bh_evrec;
  case 3: return (void *)bh_evquery;
  default: return NULL;
  }
}
