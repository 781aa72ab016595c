/* gpuwire RPC hot paths (see gw_rpc.h). */
#include "gw_rpc.h"

#include <stdarg.h>
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
      if (rt && (rt < GW_RPC_TAG_OUT_FIRST || rt > GW_RPC_TAG_OUT_LAST)) {
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

struct gw_rpc_sess {
  htab_t tab[3];
  amap_t allocs;
  uint16_t ids[GW_RPC_NHOT];
  void *fn[GW_RPC_NHOT];
  int8_t hot_by_id[65536]; /* call id -> hot index, or -1 */
};

gw_rpc_sess_t *gw_rpc_sess_new(void) {
  gw_rpc_sess_t *s = calloc(1, sizeof(*s));
  if (!s) return NULL;
  memset(s->hot_by_id, -1, sizeof(s->hot_by_id));
  return s;
}

void gw_rpc_sess_free(gw_rpc_sess_t *s) {
  if (!s) return;
  for (int k = 0; k < 3; k++) htab_free(&s->tab[k]);
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
  return htab_put(&s->tab[kind], id, handle, aux);
}

int gw_rpc_unbind(gw_rpc_sess_t *s, int kind, uint64_t id) {
  if (kind < 0 || kind > 2) return -1;
  return htab_del(&s->tab[kind], id);
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

uint32_t gw_rpc_exec(gw_rpc_sess_t *s, const uint8_t *frame, const gw_rpc_rec_t *recs, uint32_t from,
                     uint32_t n, int *res, char *err, size_t errlen) {
  uint32_t i = from;
  *res = 0;
  for (; i < n; i++) {
    const gw_rpc_rec_t *r = &recs[i];
    int which = s->hot_by_id[r->id];
    if (which < 0) break;
    const uint8_t *f = frame + r->fixed;
    int rc = 0;
    void *st = NULL;
    switch (which) {
      case GW_RPC_LAUNCH: {
        if (r->nvar < 1 || r->var_off[0] == 0xFFFFFFFFu) goto python; /* bulk params: Python */
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
        void *pbuf = (void *)(frame + r->var_off[0]);
        size_t sz = plen;
        void *extra[5] = {(void *)1, pbuf, (void *)2, &sz, (void *)0};
        rc = ((launch_fn)s->fn[which])(fh, rd32(f + 8), rd32(f + 12), rd32(f + 16), rd32(f + 20), rd32(f + 24),
                                       rd32(f + 28), rd32(f + 32), st, NULL, plen ? extra : NULL);
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
        goto python;
    }
    if (rc) {
      *res = rc;
      return i - from;
    }
  }
python:
  return i - from;
}

int gw_rpc_launch(void *fn, uint64_t f, uint32_t gx, uint32_t gy, uint32_t gz, uint32_t bx, uint32_t by,
                  uint32_t bz, uint32_t shmem, uint64_t stream, const void *params, size_t n) {
  size_t sz = n;
  void *extra[5] = {(void *)1, (void *)params, (void *)2, &sz, (void *)0};
  return ((launch_fn)fn)((void *)(uintptr_t)f, gx, gy, gz, bx, by, bz, shmem, (void *)(uintptr_t)stream, NULL,
                         n ? extra : NULL);
}

/* ------------------------------------------------------------------ host driver */

static uint64_t host_counts[GW_RPC_NHOT];

static int h_launch(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                    unsigned shmem, void *st, void **kp, void **extra) {
  (void)f; (void)gx; (void)gy; (void)gz; (void)bx; (void)by; (void)bz; (void)shmem; (void)st; (void)kp;
  if (extra && (extra[0] != (void *)1 || extra[2] != (void *)2 || extra[4] != (void *)0)) return GW_CU_INVALID_VALUE;
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

void *gw_rpc_host_fn(int which) {
  switch (which) {
    case GW_RPC_LAUNCH: return (void *)h_launch;
    case GW_RPC_MEMSET8: return (void *)h_memset8;
    case GW_RPC_MEMSET16: return (void *)h_memset16;
    case GW_RPC_MEMSET32: return (void *)h_memset32;
    case GW_RPC_DTOD: return (void *)h_dtod;
    case GW_RPC_EVREC: return (void *)h_evrec;
    case GW_RPC_WAITEV: return (void *)h_waitev;
  }
  return NULL;
}

uint64_t gw_rpc_host_count(int which) {
  if (which < 0 || which >= GW_RPC_NHOT) return 0;
  return __atomic_load_n(&host_counts[which], __ATOMIC_RELAXED);
}
