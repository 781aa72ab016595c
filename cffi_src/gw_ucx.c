/* gpuwire UCX engine (see gw_ucx.h).
 *
 * Threading: one mutex per worker serialises every call into UCX (the worker
 * runs in UCS_THREAD_MODE_SERIALIZED).  Waits take the lock only around each
 * progress pass, so other threads can post sends while one thread waits.
 * UCX callbacks run inside progress, with the lock held; they only set flags
 * and queue events, which are handled after progress returns.
 *
 * Connections: a sockaddr connect makes a control endpoint (tcp, error mode
 * PEER: UCX reports a dead peer on it) and, when both sides sit on one node,
 * a data endpoint made from the peer's worker address in error mode NONE so
 * UCX may pick shared memory.  Liveness on the data endpoint comes from the
 * control endpoint and, on one node, from a pidfd of the peer process.
 *
 * Connection ids: the sender writes the receiver's connection id into the UCX tag (and
 * into a BYE), so connections of one worker trust each other's peers not to forge it.
 * A handoff listener (gw_listen_mode) lets each accepted connection live on a worker of
 * its own (UCX accepts a connection request on any worker of the listener's context);
 * ids start at a random index and generation per worker, so they are not predictable.
 */
#define _GNU_SOURCE
#include "gw_ucx.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <ucp/api/ucp.h>

#define GW_MAGIC 0x67777531u /* "gwu1" */
#define GW_PROTO 1
#define AM_HELLO 0x4711
#define AM_WELCOME 0x4712
#define AM_BYE 0x4713
#define MAX_CONNS 65536
#define BLOCK_SLICE_NS 100000000LL
#define LIVE_CHECK_NS 2000000LL
#define LOST_CLOSE_NS 20000000LL

#define TAG_USER_MASK 0xFFFFFFull
#define TAG_CONN_MASK 0xFFFFFFFF00000000ull

static inline int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* t + ns without overflow: a negative ns (no timeout) or one past INT64_MAX is never */
static inline int64_t deadline_after(int64_t t, int64_t ns) {
  return (ns < 0 || ns > INT64_MAX - t) ? INT64_MAX : t + ns;
}

/* LOCK: while the worker's progress thread runs, a caller announces itself
 * (lock_want) so the thread, which re-takes the lock in a tight loop, steps
 * aside instead of starving it (a mutex hand-off is not fair). */
#define LOCK(w) worker_lock(w)
#define UNLOCK(w) pthread_mutex_unlock(&(w)->lock)

/* A closed conn may outlive its worker (the caller frees the struct): nothing
 * may touch c->w then, so entry points check this before taking the lock. */
#define RETURN_IF_CLOSED(c) \
  do { \
    if (!(c) || (c)->state == GW_CONN_CLOSED) return GW_ERR_BAD_STATE; \
  } while (0)


/* ------------------------------------------------------------------ types */

struct gw_ctx {
  ucp_context_h ctx;
  size_t req_size;
};

typedef struct {
  uint32_t magic, proto;
  uint32_t sender_id;    /* the sender's local id for this connection */
  uint32_t receiver_id;  /* WELCOME: the client's id; HELLO: 0 */
  uint32_t via_sockaddr; /* HELLO came over a sockaddr control endpoint */
  int32_t pid;
  uint64_t ipc_ns, pid_ns;
  char boot_id[40];
  char host[64];
  uint32_t addr_len;
  uint32_t pad;
} gw_hello_t;

/* a worker address as gpuwire hands it out: identity + UCX's address */
typedef struct {
  uint32_t magic, proto;
  int32_t pid;
  uint32_t ucx_len;
  uint64_t ipc_ns, pid_ns;
  char boot_id[40];
  char host[64];
} gw_addr_hdr_t;

struct gw_req {
  gw_worker_t *w;
  gw_req_t **plist;         /* head of the pending list it is on (a conn's, or the worker's
                               any-source receives), NULL if none */
  gw_req_t *prev, *next;    /* pending list */
  gw_req_t *free_next;
  volatile int done;
  int status;
  int ucx_busy;             /* UCX still owns the request memory */
  int released;             /* the user let go of it */
  int is_recv;
  int pumped;               /* counted in the worker's pump_n until UCX is done with it */
  size_t length;
  uint64_t sender_tag;
  int64_t t_done;
  void *rbuf;               /* receive buffer */
  size_t rcap;
  ucp_tag_recv_info_t info;
  ucp_dt_iov_t iov[2];
};

/* The argument of a UCX endpoint's error callback. It belongs to the worker, not
 * to the conn: UCX may report an error on an endpoint after the conn is gone (an
 * endpoint UCX would not close, or one whose close did not finish in time), so
 * the callback only reads this and looks the conn up by id. Freed once UCX has
 * really destroyed the endpoint, or with the worker. */
typedef struct gw_eparg {
  gw_worker_t *w;
  uint32_t conn_id;
  int peer_mode;            /* error mode PEER (force close allowed) */
  struct gw_eparg *prev, *next;
} gw_eparg_t;

/* a thread blocked in epoll on the worker: completions made by other threads
 * write its eventfd (registered under the worker lock, so none is missed) */
typedef struct gw_waiter {
  int efd;
  struct gw_waiter *prev, *next;
} gw_waiter_t;

struct gw_conn {
  gw_worker_t *w;
  uint32_t id, remote_id;
  int state;
  int lost_status;
  int via_sockaddr;
  int is_client;
  ucp_ep_h ctrl_ep, data_ep;
  gw_eparg_t *ctrl_arg, *data_arg;
  void *welcome_req;        /* server: the WELCOME send; accept waits for it to leave */
  void *welcome_blob;       /* its bytes (UCX reads them until it is sent) */
  int adopted;              /* handed to the caller (connect/accept): it frees the struct */
  int handoff;              /* accepted from a handoff request: gw_connreq_accept waits for it */
  gw_listener_t *listener;  /* accepted through this listener */
  gw_conn_t *accept_next;
  gw_req_t *pending;        /* outstanding ops on this conn */
  int pidfd;
  int32_t peer_pid;
  uint64_t peer_pid_ns;     /* the peer's identity from the handshake (packed keys carry */
  char peer_boot[40];       /* their owner's, checked against it) */
  char peer[160];
  gw_hello_t hello_out;     /* stays valid while the AM is in flight */
  int epoll_added;
};

/* Listener lifetimes (g_lst below guards w, refs, accepting, user_closed and the struct's
 * free): the struct lives until it was closed, no thread is inside gw_accept/take on it and
 * no taken request is unresolved; UCX's listener lives until it was closed and no taken
 * request is unresolved, or until its worker is destroyed (which destroys it first and sets
 * w to NULL: a request of it then fails with GW_ERR_BAD_STATE without touching UCX). */
struct gw_listener {
  gw_worker_t *w;           /* NULL once the worker was destroyed */
  ucp_listener_h l;         /* NULL once destroyed */
  int port;
  int handoff;
  int closed;               /* no more requests or accepts (set under g_lst and the lock) */
  int user_closed;          /* gw_listener_close was called */
  int accepting;            /* threads inside gw_accept / gw_listener_take on it */
  int refs;                 /* requests taken and not yet accepted or rejected */
  gw_connreq_t *taken;      /* ... those requests (g_lst) */
  gw_conn_t *q_head, *q_tail;
  gw_connreq_t *rq_head, *rq_tail; /* handoff: requests not taken yet (worker lock) */
  struct gw_listener *lst_prev, *lst_next; /* the worker's listeners (g_lst) */
};

struct gw_connreq {
  gw_listener_t *l;         /* NULL once accepted or rejected */
  ucp_conn_request_h req;
  int done;
  gw_connreq_t *next;       /* the listener's queue (worker lock) */
  gw_connreq_t *tprev, *tnext; /* the listener's taken requests (g_lst) */
  char client[64];
};

/* guards listener lifetimes across workers; taken before any worker lock, never while
 * one is held */
static pthread_mutex_t g_lst = PTHREAD_MUTEX_INITIALIZER;

/* emulated RTT: a received message whose receive was released (timed out, dropped) before
 * it showed; the next matching receive takes it (as on a real link it would still be on
 * the wire) */
typedef struct gw_held {
  struct gw_held *next;
  uint64_t sender_tag;
  size_t length;
  int64_t t_done;
  unsigned char data[];
} gw_held_t;

typedef enum { EV_CONN_REQUEST, EV_HELLO, EV_WELCOME, EV_BYE, EV_EP_ERROR } ev_kind_t;

typedef struct gw_event {
  ev_kind_t kind;
  struct gw_event *next;
  gw_listener_t *listener;
  ucp_conn_request_h conn_request;
  ucp_ep_h reply_ep;
  uint32_t conn_id;
  int status;
  gw_hello_t hello;
  size_t addr_len;
  unsigned char addr[];
} gw_event_t;

struct gw_worker {
  gw_ctx_t *ctx;
  ucp_worker_h w;           /* data: tagged messages, RMA, address eps */
  ucp_worker_h cw;          /* control: sockaddr listener/eps (tcp, error mode PEER) */
  pthread_mutex_t lock;
  int efd, cefd, epfd;
  int ctrl_hot;             /* >0: progress the control worker on every pass */
  int64_t spin_ns;
  int64_t call_spin_max_ns; /* >spin_ns: gw_call spins up to 2x its recent waits, up to this */
  int64_t call_hint_ns;     /* gw_call's recent waits: a maximum decaying by 1/8 per call */
  int64_t rtt_half_ns;
  int64_t last_live_check;
  gw_conn_t **conns;
  uint16_t *gens;
  uint32_t next_idx;
  gw_event_t *ev_head, *ev_tail;
  gw_req_t *free_reqs;
  unsigned char *addr;      /* gpuwire worker address: hdr + ucx address */
  size_t addr_len;
  ucp_address_t *ucx_addr;
  size_t ucx_addr_len;
  gw_conn_t *addr_q_head, *addr_q_tail; /* accepted by address */
  gw_listener_t *listeners; /* listeners of this worker's not yet freed (g_lst) */
  uint32_t *lost;           /* ring of lost conn ids */
  int lost_n, lost_cap;
  int n_pidfds;
  volatile int n_blocked;
  gw_waiter_t *waiters;     /* threads blocked in epoll (lock held to change) */
  gw_eparg_t *epargs;       /* error-callback args of live UCX endpoints */
  void **deferred;          /* blocks UCX may still read: freed with the worker */
  int n_deferred, cap_deferred;
  int64_t held_due;         /* emulated RTT: earliest time a held receive shows */
  gw_held_t *held_head, *held_tail; /* emulated RTT: released before they showed */
  gw_req_t *any_pending;    /* posted any-source receives */
  volatile int closing;     /* gw_worker_destroy runs: waits end with GW_ERR_BAD_STATE */
  int n_inside;             /* threads inside a waiting entry point (atomic) */
  gw_hello_t self;          /* our identity */
  /* progress thread ("pump"): drives the worker while sends/receives of at
   * least pump_min bytes are in flight, so their bytes move while the owning
   * thread runs other code (over tcp nothing moves without progress) */
  pthread_t pump_th;
  pthread_cond_t pump_cv;   /* waited on with `lock`: pump_n became > 0, or stop */
  int pump_started;
  volatile int pump_on;
  volatile int pump_stop;
  int pump_sleeping;
  int pump_n;               /* pumped requests UCX still owns (lock held) */
  size_t pump_min;
  volatile int lock_want;   /* callers waiting for `lock` while the pump runs */
  uint64_t pump_passes, pump_blocks, pump_reqs;
  uint64_t blocked_total;   /* waits that blocked on the event fd (block_once), all threads */
};

static inline void worker_lock(gw_worker_t *w) {
  if (w->pump_on) {
    __atomic_add_fetch(&w->lock_want, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&w->lock);
    __atomic_sub_fetch(&w->lock_want, 1, __ATOMIC_SEQ_CST);
  } else {
    pthread_mutex_lock(&w->lock);
  }
}

/* ------------------------------------------------------------- versions */

uint32_t gw_built_api_version(void) { return (UCP_API_MAJOR << 16) | UCP_API_MINOR; }

void gw_runtime_version(unsigned *major, unsigned *minor, unsigned *release) {
  ucp_get_version(major, minor, release);
}

const char *gw_status_string(int status) {
  switch (status) {
  case GW_ERR_CONN_LOST: return "connection lost";
  case GW_ERR_OUT_OF_RANGE: return "remote address outside the registered region";
  case GW_ERR_BAD_STATE: return "connection is closed";
  case GW_ERR_PROTOCOL: return "peer is not a gpuwire peer of this protocol version";
  case GW_ERR_TRUNCATED: return "message longer than the receive buffer";
  case GW_ERR_PEER_EXITED: return "peer process exited";
  case GW_ERR_READ_ONLY: return "the remote region is read-only";
  case GW_ERR_FOREIGN_KEY: return "the packed key belongs to another process than this connection's peer";
  default: return ucs_status_string((ucs_status_t)status);
  }
}

int gw_lib_path(char *buf, size_t len) {
  Dl_info info;
  if (!dladdr((void *)&ucp_get_version, &info) || !info.dli_fname) return -1;
  snprintf(buf, len, "%s", info.dli_fname);
  return 0;
}

/* ---------------------------------------------------------------- identity */

static uint64_t ns_inode(const char *path) {
  struct stat st;
  if (stat(path, &st) != 0) return 0;
  return (uint64_t)st.st_ino;
}

static void fill_identity(gw_hello_t *h) {
  memset(h, 0, sizeof(*h));
  h->magic = GW_MAGIC;
  h->proto = GW_PROTO;
  h->pid = (int32_t)getpid();
  h->ipc_ns = ns_inode("/proc/self/ns/ipc");
  h->pid_ns = ns_inode("/proc/self/ns/pid");
  FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
  if (f) {
    if (!fgets(h->boot_id, sizeof(h->boot_id), f)) h->boot_id[0] = 0;
    fclose(f);
    h->boot_id[strcspn(h->boot_id, "\n")] = 0;
  }
  gethostname(h->host, sizeof(h->host) - 1);
}

/* same kernel and same IPC namespace: UCX's shared memory can reach the peer */
static int same_node(const gw_hello_t *a, const char *boot_id, uint64_t ipc_ns) {
  return a->boot_id[0] && strcmp(a->boot_id, boot_id) == 0 && a->ipc_ns == ipc_ns;
}

/* ----------------------------------------------------------------- context */

int gw_ctx_create(const char **keys, const char **vals, int n, gw_ctx_t **out, char *err,
                  size_t errlen) {
  ucp_config_t *cfg;
  ucs_status_t st = ucp_config_read(NULL, NULL, &cfg);
  if (st != UCS_OK) {
    snprintf(err, errlen, "ucp_config_read: %s", ucs_status_string(st));
    return st;
  }
  for (int i = 0; i < n; i++) {
    st = ucp_config_modify(cfg, keys[i], vals[i]);
    if (st != UCS_OK) {
      snprintf(err, errlen, "UCX setting %s=%s: %s", keys[i], vals[i], ucs_status_string(st));
      ucp_config_release(cfg);
      return st;
    }
  }
  ucp_params_t p;
  memset(&p, 0, sizeof(p));
  p.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  p.features = UCP_FEATURE_TAG | UCP_FEATURE_AM | UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  p.mt_workers_shared = 1;
  gw_ctx_t *c = calloc(1, sizeof(*c));
  st = ucp_init(&p, cfg, &c->ctx);
  ucp_config_release(cfg);
  if (st != UCS_OK) {
    snprintf(err, errlen, "ucp_init: %s", ucs_status_string(st));
    free(c);
    return st;
  }
  ucp_context_attr_t a;
  a.field_mask = UCP_ATTR_FIELD_REQUEST_SIZE;
  ucp_context_query(c->ctx, &a);
  c->req_size = (a.request_size + 63) & ~(size_t)63;
  *out = c;
  return 0;
}

void gw_ctx_destroy(gw_ctx_t *c) {
  if (!c) return;
  ucp_cleanup(c->ctx);
  free(c);
}

static int print_to_buf(char *buf, size_t len, void (*fn)(void *, FILE *), void *arg) {
  FILE *f = fmemopen(buf, len, "w");
  if (!f) return -1;
  fn(arg, f);
  long n = ftell(f);
  fclose(f);
  if (n >= (long)len) n = (long)len - 1;
  buf[n < 0 ? 0 : n] = 0;
  return (int)n;
}

static void print_info_cb(void *arg, FILE *f) { ucp_context_print_info((ucp_context_h)arg, f); }

int gw_ctx_info(gw_ctx_t *c, char *buf, size_t len) {
  return print_to_buf(buf, len, print_info_cb, c->ctx);
}

static void print_cfg_cb(void *arg, FILE *f) {
  (void)arg;
  ucp_config_t *cfg;
  if (ucp_config_read(NULL, NULL, &cfg) != UCS_OK) return;
  ucp_config_print(cfg, f, NULL, UCS_CONFIG_PRINT_CONFIG);
  ucp_config_release(cfg);
}

int gw_ctx_config(gw_ctx_t *c, char *buf, size_t len) {
  (void)c;
  return print_to_buf(buf, len, print_cfg_cb, NULL);
}

/* ----------------------------------------------------------- request pool */

static gw_req_t *req_get(gw_worker_t *w) {
  gw_req_t *r = w->free_reqs;
  if (r) {
    w->free_reqs = r->free_next;
  } else {
    size_t rs = w->ctx->req_size;
    unsigned char *mem = aligned_alloc(64, rs + ((sizeof(gw_req_t) + 63) & ~(size_t)63));
    if (!mem) return NULL;
    r = (gw_req_t *)(mem + rs);
  }
  memset(r, 0, sizeof(*r));
  r->w = w;
  return r;
}

static void req_put(gw_worker_t *w, gw_req_t *r) {
  r->free_next = w->free_reqs;
  w->free_reqs = r;
}

static void req_unlink(gw_req_t *r) {
  gw_req_t **head = r->plist;
  if (!head) return;
  if (r->prev) r->prev->next = r->next;
  else *head = r->next;
  if (r->next) r->next->prev = r->prev;
  r->prev = r->next = NULL;
  r->plist = NULL;
}

static void req_link(gw_req_t **head, gw_req_t *r) {
  r->plist = head;
  r->prev = NULL;
  r->next = *head;
  if (*head) (*head)->prev = r;
  *head = r;
}

/* threads inside a waiting entry point: gw_worker_destroy waits for them to leave */
static inline int worker_enter(gw_worker_t *w) {
  __atomic_add_fetch(&w->n_inside, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&w->closing, __ATOMIC_SEQ_CST)) {
    __atomic_sub_fetch(&w->n_inside, 1, __ATOMIC_SEQ_CST);
    return 1;
  }
  return 0;
}
static inline void worker_leave(gw_worker_t *w) { __atomic_sub_fetch(&w->n_inside, 1, __ATOMIC_SEQ_CST); }

static void req_complete(gw_req_t *r, int status) {
  if (!r->done) {
    r->status = status;
    if (r->w->rtt_half_ns) r->t_done = now_ns();
    r->done = 1;
  }
  req_unlink(r);
}

/* wake every thread blocked on the worker (lock held): a request one of them
 * waits for may just have completed in this thread's progress */
static void wake_waiters(gw_worker_t *w) {
  static const uint64_t one = 1;
  for (gw_waiter_t *x = w->waiters; x; x = x->next) {
    ssize_t rc = write(x->efd, &one, sizeof(one));
    (void)rc;
  }
}

/* UCX is done with the request memory */
static void req_ucx_done(gw_req_t *r) {
  r->ucx_busy = 0;
  if (r->pumped) {
    r->pumped = 0;
    r->w->pump_n--;
  }
  if (r->released) req_put(r->w, r);
  else if (r->w->waiters) wake_waiters(r->w);
}

/* a request UCX now owns (lock held): the pump drives it if it is big enough */
static inline void pump_note(gw_worker_t *w, gw_req_t *r, size_t len) {
  if (!w->pump_on || len < w->pump_min) return;
  r->pumped = 1;
  w->pump_reqs++;
  if (w->pump_n++ == 0 && w->pump_sleeping) pthread_cond_signal(&w->pump_cv);
}

static void send_cb(void *request, ucs_status_t status, void *user_data) {
  (void)user_data;
  gw_req_t *r = (gw_req_t *)request;
  req_complete(r, status);
  req_ucx_done(r);
}

static void recv_cb(void *request, ucs_status_t status, const ucp_tag_recv_info_t *info,
                    void *user_data) {
  (void)user_data;
  gw_req_t *r = (gw_req_t *)request;
  if (status == UCS_OK || status == UCS_ERR_MESSAGE_TRUNCATED) {
    r->length = info->length;
    r->sender_tag = info->sender_tag;
  }
  req_complete(r, status == UCS_ERR_MESSAGE_TRUNCATED ? GW_ERR_TRUNCATED : status);
  req_ucx_done(r);
}

/* ----------------------------------------------------------------- events */

static void ev_push(gw_worker_t *w, gw_event_t *e) {
  e->next = NULL;
  if (w->ev_tail) w->ev_tail->next = e;
  else w->ev_head = e;
  w->ev_tail = e;
}

static gw_event_t *ev_new(ev_kind_t kind, size_t extra) {
  gw_event_t *e = calloc(1, sizeof(gw_event_t) + extra);
  if (e) e->kind = kind;
  return e;
}

static gw_conn_t *conn_lookup(gw_worker_t *w, uint32_t id) {
  uint32_t idx = id & 0xFFFF;
  gw_conn_t *c = w->conns[idx];
  if (c && c->id == id) return c;
  return NULL;
}

static gw_conn_t *conn_new(gw_worker_t *w) {
  for (uint32_t k = 0; k < MAX_CONNS; k++) {
    uint32_t idx = (w->next_idx + k) % MAX_CONNS;
    if (idx == 0 || w->conns[idx]) continue;
    gw_conn_t *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    w->gens[idx] = (uint16_t)(w->gens[idx] + 1);
    if (w->gens[idx] == 0) w->gens[idx] = 1;
    c->id = ((uint32_t)w->gens[idx] << 16) | idx;
    c->w = w;
    c->pidfd = -1;
    c->state = GW_CONN_CONNECTING;
    w->conns[idx] = c;
    w->next_idx = idx + 1;
    return c;
  }
  return NULL;
}

static void lost_push(gw_worker_t *w, uint32_t id) {
  if (w->lost_n == w->lost_cap) {
    int cap = w->lost_cap ? w->lost_cap * 2 : 64;
    uint32_t *n = realloc(w->lost, cap * sizeof(uint32_t));
    if (!n) return;
    w->lost = n;
    w->lost_cap = cap;
  }
  w->lost[w->lost_n++] = id;
}

static void pidfd_drop(gw_conn_t *c) {
  if (c->pidfd >= 0) {
    epoll_ctl(c->w->epfd, EPOLL_CTL_DEL, c->pidfd, NULL);
    close(c->pidfd);
    c->pidfd = -1;
    c->w->n_pidfds--;
  }
}

/* fail every outstanding op of a pending list with `status` */
static void fail_pending(gw_worker_t *w, gw_req_t **head, int status) {
  while (*head) {
    gw_req_t *r = *head;
    req_complete(r, status); /* unlinks */
    if (r->ucx_busy && r->is_recv) ucp_request_cancel(w->w, r);
  }
}

static void conn_fail_pending(gw_conn_t *c, int status) { fail_pending(c->w, &c->pending, status); }

static void conn_mark_lost(gw_conn_t *c, int status) {
  if (c->state == GW_CONN_LOST || c->state == GW_CONN_CLOSED) return;
  int was_up = c->state == GW_CONN_UP;
  c->state = GW_CONN_LOST;
  c->lost_status = status;
  conn_fail_pending(c, GW_ERR_CONN_LOST);
  pidfd_drop(c);
  if (was_up) lost_push(c->w, c->id);
}

static void ep_err_cb(void *arg, ucp_ep_h ep, ucs_status_t status) {
  (void)ep;
  gw_eparg_t *a = (gw_eparg_t *)arg;
  if (!a->conn_id) return; /* the conn is gone; nothing to tell */
  gw_event_t *e = ev_new(EV_EP_ERROR, 0);
  if (!e) return;
  e->conn_id = a->conn_id;
  e->status = status;
  ev_push(a->w, e);
}

static gw_eparg_t *eparg_new(gw_conn_t *c, int peer_mode) {
  gw_worker_t *w = c->w;
  gw_eparg_t *a = calloc(1, sizeof(*a));
  if (!a) return NULL;
  a->w = w;
  a->conn_id = c->id;
  a->peer_mode = peer_mode;
  a->next = w->epargs;
  if (w->epargs) w->epargs->prev = a;
  w->epargs = a;
  return a;
}

static void defer_free(gw_worker_t *w, void *p) {
  if (!p) return;
  if (w->n_deferred == w->cap_deferred) {
    int cap = w->cap_deferred ? 2 * w->cap_deferred : 16;
    void **n = realloc(w->deferred, cap * sizeof(void *));
    if (!n) return; /* leak rather than free what UCX may read */
    w->deferred = n;
    w->cap_deferred = cap;
  }
  w->deferred[w->n_deferred++] = p;
}

static void eparg_free(gw_eparg_t *a) {
  if (!a) return;
  gw_worker_t *w = a->w;
  if (a->prev) a->prev->next = a->next;
  else w->epargs = a->next;
  if (a->next) a->next->prev = a->prev;
  free(a);
}

static void conn_req_cb(ucp_conn_request_h conn_request, void *arg) {
  gw_listener_t *l = (gw_listener_t *)arg;
  gw_event_t *e = ev_new(EV_CONN_REQUEST, 0);
  if (!e) {
    ucp_listener_reject(l->l, conn_request);
    return;
  }
  e->listener = l;
  e->conn_request = conn_request;
  ev_push(l->w, e);
}

static ucs_status_t am_cb(void *arg, const void *header, size_t header_length, void *data,
                          size_t length, const ucp_am_recv_param_t *param, ev_kind_t kind) {
  gw_worker_t *w = (gw_worker_t *)arg;
  if (kind == EV_BYE) {
    if (header_length != sizeof(uint32_t)) return UCS_OK;
    gw_event_t *e = ev_new(EV_BYE, 0);
    if (!e) return UCS_OK;
    memcpy(&e->conn_id, header, sizeof(uint32_t));
    ev_push(w, e);
    return UCS_OK;
  }
  if (header_length != sizeof(gw_hello_t)) return UCS_OK; /* not ours: drop */
  if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) return UCS_OK;
  gw_event_t *e = ev_new(kind, length);
  if (!e) return UCS_OK;
  memcpy(&e->hello, header, sizeof(gw_hello_t));
  memcpy(e->addr, data, length);
  e->addr_len = length;
  e->reply_ep = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : NULL;
  ev_push(w, e);
  return UCS_OK;
}

static ucs_status_t am_hello_cb(void *arg, const void *h, size_t hl, void *d, size_t l,
                                const ucp_am_recv_param_t *p) {
  return am_cb(arg, h, hl, d, l, p, EV_HELLO);
}
static ucs_status_t am_welcome_cb(void *arg, const void *h, size_t hl, void *d, size_t l,
                                  const ucp_am_recv_param_t *p) {
  return am_cb(arg, h, hl, d, l, p, EV_WELCOME);
}
static ucs_status_t am_bye_cb(void *arg, const void *h, size_t hl, void *d, size_t l,
                              const ucp_am_recv_param_t *p) {
  return am_cb(arg, h, hl, d, l, p, EV_BYE);
}

static void am_send_cb(void *request, ucs_status_t status, void *user_data) {
  (void)status;
  free(user_data);
  ucp_request_free(request);
}

/* fire-and-forget handshake message; header and data are copied so that the
 * message never points into a conn that may be freed while it is queued */
static void am_send(ucp_ep_h ep, unsigned id, const void *hdr, size_t hlen, const void *data,
                    size_t len, int reply) {
  unsigned char *copy = malloc(hlen + len + 1);
  if (!copy) return;
  memcpy(copy, hdr, hlen);
  if (len) memcpy(copy + hlen, data, len);
  ucp_request_param_t p;
  memset(&p, 0, sizeof(p));
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_FLAGS |
                   UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = am_send_cb;
  p.user_data = copy;
  p.flags = reply ? UCP_AM_SEND_FLAG_REPLY : 0;
  ucs_status_ptr_t sp = ucp_am_send_nbx(ep, id, copy, hlen, copy + hlen, len, &p);
  if (!UCS_PTR_IS_PTR(sp)) free(copy); /* done (or failed: errors surface on the ep) */
}

/* Error mode of data endpoints. PEER costs ~2.3 us per message on tcp
 * (ucx_perftest -e) and disables shared memory, so data endpoints run in mode
 * NONE; peer failure is detected on the control endpoint (sockaddr, PEER) or
 * by a pidfd on one node. An address connection to another node has neither,
 * so it runs in PEER mode. */
static int data_err_none(gw_conn_t *c, const gw_hello_t *peer) {
  gw_worker_t *w = c->w;
  return c->via_sockaddr ||
         (same_node(peer, w->self.boot_id, w->self.ipc_ns) && peer->pid_ns == w->self.pid_ns);
}

/* data endpoint from a peer's UCX address; on one node in mode NONE so shared
 * memory is allowed, keeping it only if UCX did not pick tcp for it. */
static ucp_ep_h make_addr_ep(gw_conn_t *c, const void *ucx_addr, int local) {
  gw_eparg_t *a = eparg_new(c, !local);
  if (!a) return NULL;
  ucp_ep_params_t ep;
  memset(&ep, 0, sizeof(ep));
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = (const ucp_address_t *)ucx_addr;
  ep.err_mode = local ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = ep_err_cb;
  ep.err_handler.arg = a;
  ucp_ep_h h;
  if (ucp_ep_create(c->w->w, &ep, &h) != UCS_OK) {
    eparg_free(a);
    return NULL;
  }
  c->data_arg = a;
  return h;
}

typedef struct {
  void *req;
} close_arg_t;

static int cond_req_done(void *arg) {
  void *r = ((close_arg_t *)arg)->req;
  return ucp_request_check_status(r) != UCS_INPROGRESS;
}

static int wait_cond(gw_worker_t *w, int (*cond)(void *), void *arg, int64_t timeout_ns);
static void listener_teardown_locked(gw_listener_t *l);
static int wait_cond_spin(gw_worker_t *w, int (*cond)(void *), void *arg, int64_t timeout_ns,
                          int64_t spin_ns);

/* Close a UCX endpoint; its error-callback arg is freed once UCX has destroyed
 * it. A forced close is asked for only in error mode PEER: UCX refuses it for
 * mode NONE (UCS_ERR_INVALID_PARAM) and the endpoint would live on, so those
 * close in flush mode. Waits up to timeout_ns; have_lock: the caller holds the
 * worker lock (progress here directly), else wait_cond takes it per pass. An
 * endpoint whose close does not finish in time is left to UCX (it finishes
 * later or with the worker); its arg stays valid until the worker goes. */
static void ep_close(gw_worker_t *w, ucp_ep_h ep, gw_eparg_t *a, int force, int64_t timeout_ns,
                     int have_lock) {
  if (!ep) return;
  if (a) a->conn_id = 0; /* no more error events for the conn */
  ucp_request_param_t p;
  memset(&p, 0, sizeof(p));
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = (force && (!a || a->peer_mode)) ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  if (!have_lock) LOCK(w);
  void *r = ucp_ep_close_nbx(ep, &p);
  if (UCS_PTR_IS_ERR(r) && p.flags) { /* refused: close in flush mode */
    p.flags = 0;
    r = ucp_ep_close_nbx(ep, &p);
  }
  if (!UCS_PTR_IS_PTR(r)) {
    if (!UCS_PTR_IS_ERR(r)) eparg_free(a); /* closed at once */
    if (!have_lock) UNLOCK(w);
    return;
  }
  if (have_lock) {
    int64_t end = deadline_after(now_ns(), timeout_ns < 0 ? 1000000000LL : timeout_ns);
    while (ucp_request_check_status(r) == UCS_INPROGRESS && now_ns() < end) {
      ucp_worker_progress(w->w);
      ucp_worker_progress(w->cw);
    }
  } else {
    UNLOCK(w);
    close_arg_t ca = {r};
    wait_cond(w, cond_req_done, &ca, timeout_ns < 0 ? 1000000000LL : timeout_ns);
    LOCK(w);
  }
  if (ucp_request_check_status(r) != UCS_INPROGRESS) eparg_free(a);
  ucp_request_free(r);
  if (!have_lock) UNLOCK(w);
}

static void conn_watch_pid(gw_conn_t *c, const gw_hello_t *peer) {
  gw_worker_t *w = c->w;
  c->peer_pid = peer->pid;
  c->peer_pid_ns = peer->pid_ns;
  memcpy(c->peer_boot, peer->boot_id, sizeof(c->peer_boot));
  c->peer_boot[sizeof(c->peer_boot) - 1] = 0;
  if (!same_node(peer, w->self.boot_id, w->self.ipc_ns) || peer->pid_ns != w->self.pid_ns)
    return;
  int fd = (int)syscall(SYS_pidfd_open, (pid_t)peer->pid, 0);
  if (fd < 0) return;
  struct epoll_event ev = {.events = EPOLLIN, .data = {.u64 = c->id}};
  if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
    close(fd);
    return;
  }
  c->pidfd = fd;
  w->n_pidfds++;
}

/* the data endpoint lives on the data worker, made from the peer's data-worker
 * address; 0 if UCX could not make one */
static int conn_set_data_ep(gw_conn_t *c, const gw_hello_t *peer, const void *ucx_addr) {
  c->data_ep = make_addr_ep(c, ucx_addr, data_err_none(c, peer));
  return c->data_ep != NULL;
}

static void peer_name(gw_conn_t *c, const gw_hello_t *h, const char *how) {
  snprintf(c->peer, sizeof(c->peer), "%s pid %d (%s)", h->host, h->pid, how);
}

/* "ip:port" of a connection request's client ("" if UCX does not say) */
static void connreq_client_addr(ucp_conn_request_h req, char *buf, size_t len) {
  ucp_conn_request_attr_t a;
  memset(&a, 0, sizeof(a));
  a.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  buf[0] = 0;
  if (ucp_conn_request_query(req, &a) != UCS_OK) return;
  char ip[INET6_ADDRSTRLEN] = "";
  if (a.client_address.ss_family == AF_INET) {
    struct sockaddr_in *s4 = (struct sockaddr_in *)&a.client_address;
    inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
    snprintf(buf, len, "%s:%d", ip, ntohs(s4->sin_port));
  } else if (a.client_address.ss_family == AF_INET6) {
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&a.client_address;
    inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
    snprintf(buf, len, "[%s]:%d", ip, ntohs(s6->sin6_port));
  }
}

/* the control endpoint of an accepted connection (error mode PEER) on w's control worker,
 * from its connection request; c->ctrl_arg is its error-callback arg */
static ucs_status_t ctrl_ep_accept(gw_worker_t *w, gw_conn_t *c, ucp_conn_request_h req) {
  ucp_ep_params_t ep;
  memset(&ep, 0, sizeof(ep));
  ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.conn_request = req;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = ep_err_cb;
  ep.err_handler.arg = c->ctrl_arg;
  return ucp_ep_create(w->cw, &ep, &c->ctrl_ep);
}

static void handle_conn_request(gw_worker_t *w, gw_event_t *e) {
  gw_listener_t *l = e->listener;
  if (l->closed) {
    if (l->l) ucp_listener_reject(l->l, e->conn_request);
    return;
  }
  if (l->handoff) { /* queued for gw_listener_take; accepted on a worker of the taker's choice */
    gw_connreq_t *r = calloc(1, sizeof(*r));
    if (!r) {
      ucp_listener_reject(l->l, e->conn_request);
      return;
    }
    r->req = e->conn_request;
    connreq_client_addr(r->req, r->client, sizeof(r->client));
    if (l->rq_tail) l->rq_tail->next = r;
    else l->rq_head = r;
    l->rq_tail = r;
    if (w->waiters) wake_waiters(w);
    return;
  }
  gw_conn_t *c = conn_new(w);
  if (!c) {
    ucp_listener_reject(l->l, e->conn_request);
    return;
  }
  c->ctrl_arg = eparg_new(c, 1);
  if (!c->ctrl_arg || ctrl_ep_accept(w, c, e->conn_request) != UCS_OK) {
    if (!c->ctrl_arg) ucp_listener_reject(l->l, e->conn_request);
    eparg_free(c->ctrl_arg);
    w->conns[c->id & 0xFFFF] = NULL;
    free(c);
    return;
  }
  c->listener = l;
  c->via_sockaddr = 1;
}

static void accept_push(gw_conn_t **head, gw_conn_t **tail, gw_conn_t *c) {
  c->accept_next = NULL;
  if (*tail) (*tail)->accept_next = c;
  else *head = c;
  *tail = c;
}

static void handle_hello(gw_worker_t *w, gw_event_t *e) {
  gw_hello_t *h = &e->hello;
  if (h->magic != GW_MAGIC || h->proto != GW_PROTO) return;
  gw_conn_t *c = NULL;
  if (h->via_sockaddr) {
    if (!e->reply_ep) return;
    for (uint32_t i = 1; i < MAX_CONNS && !c; i++) {
      gw_conn_t *x = w->conns[i];
      if (x && x->state == GW_CONN_CONNECTING && !x->is_client && x->ctrl_ep == e->reply_ep)
        c = x;
    }
    if (!c) return;
    c->remote_id = h->sender_id;
    if (!conn_set_data_ep(c, h, e->addr)) {
      conn_mark_lost(c, UCS_ERR_UNREACHABLE);
      return;
    }
    peer_name(c, h, "sockaddr");
  } else {
    c = conn_new(w);
    if (!c) return;
    c->remote_id = h->sender_id;
    c->data_ep = make_addr_ep(c, e->addr, data_err_none(c, h));
    if (!c->data_ep) {
      w->conns[c->id & 0xFFFF] = NULL;
      free(c);
      return;
    }
    peer_name(c, h, "address");
  }
  conn_watch_pid(c, h);
  c->hello_out = w->self;
  c->hello_out.sender_id = c->id;
  c->hello_out.receiver_id = h->sender_id;
  c->hello_out.addr_len = (uint32_t)w->ucx_addr_len;
  /* accept() hands the conn out only once the WELCOME has left: the client's
   * connect must not depend on the server progressing after accept. (UCX holds
   * a send on a server endpoint that is still being wired up.) */
  ucp_ep_h rep_ep = c->ctrl_ep ? c->ctrl_ep : c->data_ep;
  size_t wl = sizeof(gw_hello_t) + w->ucx_addr_len;
  unsigned char *blob = malloc(wl);
  if (blob) {
    memcpy(blob, &c->hello_out, sizeof(gw_hello_t));
    memcpy(blob + sizeof(gw_hello_t), w->ucx_addr, w->ucx_addr_len);
    ucp_request_param_t sp;
    memset(&sp, 0, sizeof(sp));
    void *sr = ucp_am_send_nbx(rep_ep, AM_WELCOME, blob, sizeof(gw_hello_t),
                               blob + sizeof(gw_hello_t), w->ucx_addr_len, &sp);
    if (UCS_PTR_IS_PTR(sr)) {
      c->welcome_req = sr;
      c->welcome_blob = blob;
    } else {
      free(blob);
    }
  }
  c->state = GW_CONN_UP;
  if (c->handoff) { /* gw_connreq_accept waits for it */
    if (w->waiters) wake_waiters(w);
  } else if (c->listener) {
    accept_push(&c->listener->q_head, &c->listener->q_tail, c);
  } else {
    accept_push(&w->addr_q_head, &w->addr_q_tail, c);
  }
}

static void handle_welcome(gw_worker_t *w, gw_event_t *e) {
  gw_hello_t *h = &e->hello;
  gw_conn_t *c = conn_lookup(w, h->receiver_id);
  if (!c || !c->is_client || c->state != GW_CONN_CONNECTING) return;
  if (h->magic != GW_MAGIC || h->proto != GW_PROTO) {
    conn_mark_lost(c, GW_ERR_PROTOCOL);
    return;
  }
  c->remote_id = h->sender_id;
  if (c->via_sockaddr && !conn_set_data_ep(c, h, e->addr)) {
    conn_mark_lost(c, UCS_ERR_UNREACHABLE);
    return;
  }
  peer_name(c, h, c->via_sockaddr ? "sockaddr" : "address");
  conn_watch_pid(c, h);
  c->state = GW_CONN_UP;
}

static void process_events(gw_worker_t *w) {
  while (w->ev_head) {
    gw_event_t *e = w->ev_head;
    w->ev_head = e->next;
    if (!w->ev_head) w->ev_tail = NULL;
    switch (e->kind) {
    case EV_CONN_REQUEST: handle_conn_request(w, e); break;
    case EV_HELLO: handle_hello(w, e); break;
    case EV_WELCOME: handle_welcome(w, e); break;
    case EV_BYE: {
      gw_conn_t *c = conn_lookup(w, e->conn_id);
      if (c) {
        /* BYE comes over the control worker, the peer's last messages over the data
         * worker: deliver what already arrived before failing the receives */
        for (int k = 0; c->state == GW_CONN_UP && k < 64 && ucp_worker_progress(w->w); k++)
          ;
        conn_mark_lost(c, UCS_ERR_CONNECTION_RESET);
      }
      break;
    }
    case EV_EP_ERROR: {
      gw_conn_t *c = conn_lookup(w, e->conn_id);
      if (c) conn_mark_lost(c, e->status);
      break;
    }
    }
    free(e);
  }
}

/* pidfds sit in the worker's epoll set (data.u64 = conn id; 0/1 are the UCX
 * event fds): one non-blocking epoll_wait finds peers that exited. */
static void check_liveness(gw_worker_t *w) {
  if (!w->n_pidfds) return;
  struct epoll_event evs[16];
  int n = epoll_wait(w->epfd, evs, 16, 0);
  for (int i = 0; i < n; i++) {
    if (evs[i].data.u64 <= 1) continue;
    gw_conn_t *c = conn_lookup(w, (uint32_t)evs[i].data.u64);
    if (c) conn_mark_lost(c, GW_ERR_PEER_EXITED);
  }
}

static inline int progress_locked(gw_worker_t *w) {
  int n = ucp_worker_progress(w->w);
  if (w->ctrl_hot) n += ucp_worker_progress(w->cw);
  if (w->ev_head) process_events(w);
  return n;
}

/* the control worker's tcp polling costs a syscall: it runs every LIVE_CHECK_NS
 * from waits, on every pass while a connect/accept waits, and on wake-ups */
static inline int progress_ctrl_locked(gw_worker_t *w) {
  int n = ucp_worker_progress(w->cw);
  if (w->ev_head) process_events(w);
  return n;
}

/* ------------------------------------------------------------------ worker */

/* n random bytes (getrandom; /dev/urandom or the clock if that fails) */
static void random_fill(void *buf, size_t n) {
  unsigned char *p = (unsigned char *)buf;
  size_t got = 0;
  while (got < n) {
    ssize_t k = getrandom(p + got, n - got, GRND_NONBLOCK);
    if (k <= 0) break;
    got += (size_t)k;
  }
  if (got < n) {
    FILE *f = fopen("/dev/urandom", "rb");
    if (f) {
      got += fread(p + got, 1, n - got, f);
      fclose(f);
    }
  }
  if (got < n) { /* last resort: not secret, but not the same for every worker */
    uint64_t x = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)buf;
    for (; got < n; got++) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      p[got] = (unsigned char)x;
    }
  }
}

int gw_worker_create(gw_ctx_t *ctx, gw_worker_t **out) {
  gw_worker_t *w = calloc(1, sizeof(*w));
  if (!w) return UCS_ERR_NO_MEMORY;
  w->ctx = ctx;
  w->spin_ns = 50000; /* 50 us spin before blocking */
  w->conns = calloc(MAX_CONNS, sizeof(gw_conn_t *));
  w->gens = calloc(MAX_CONNS, sizeof(uint16_t));
  if (!w->conns || !w->gens) {
    free(w->conns);
    free(w->gens);
    free(w);
    return UCS_ERR_NO_MEMORY;
  }
  /* connection ids (generation << 16 | index) start at a random index and a random
   * generation per index: a peer cannot predict the ids of other connections */
  random_fill(w->gens, MAX_CONNS * sizeof(uint16_t));
  uint16_t start;
  random_fill(&start, sizeof(start));
  w->next_idx = start ? start : 1;
  pthread_mutex_init(&w->lock, NULL);
  pthread_cond_init(&w->pump_cv, NULL);
  w->pump_min = 65536;
  fill_identity(&w->self);
  ucp_worker_params_t p;
  memset(&p, 0, sizeof(p));
  p.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  p.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  ucs_status_t st = ucp_worker_create(ctx->ctx, &p, &w->w);
  if (st != UCS_OK) goto fail;
  st = ucp_worker_create(ctx->ctx, &p, &w->cw);
  if (st != UCS_OK) {
    ucp_worker_destroy(w->w);
    goto fail;
  }
  st = ucp_worker_get_efd(w->w, &w->efd);
  if (st == UCS_OK) st = ucp_worker_get_efd(w->cw, &w->cefd);
  if (st != UCS_OK) goto fail_w;
  w->epfd = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev = {.events = EPOLLIN, .data = {.u64 = 0}};
  epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->efd, &ev);
  ev.data.u64 = 1;
  epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->cefd, &ev);
  st = ucp_worker_get_address(w->w, &w->ucx_addr, &w->ucx_addr_len);
  if (st != UCS_OK) goto fail_w;
  w->addr_len = sizeof(gw_addr_hdr_t) + w->ucx_addr_len;
  w->addr = malloc(w->addr_len);
  gw_addr_hdr_t ah;
  memset(&ah, 0, sizeof(ah));
  ah.magic = GW_MAGIC;
  ah.proto = GW_PROTO;
  ah.pid = w->self.pid;
  ah.ucx_len = (uint32_t)w->ucx_addr_len;
  ah.ipc_ns = w->self.ipc_ns;
  ah.pid_ns = w->self.pid_ns;
  memcpy(ah.boot_id, w->self.boot_id, sizeof(ah.boot_id));
  memcpy(ah.host, w->self.host, sizeof(ah.host));
  memcpy(w->addr, &ah, sizeof(ah));
  memcpy(w->addr + sizeof(ah), w->ucx_addr, w->ucx_addr_len);
  ucp_am_handler_param_t hp;
  memset(&hp, 0, sizeof(hp));
  hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  hp.arg = w;
  hp.flags = UCP_AM_FLAG_WHOLE_MSG;
  ucp_worker_h both[2] = {w->w, w->cw};
  for (int i = 0; i < 2; i++) {
    hp.id = AM_HELLO;
    hp.cb = am_hello_cb;
    ucp_worker_set_am_recv_handler(both[i], &hp);
    hp.id = AM_WELCOME;
    hp.cb = am_welcome_cb;
    ucp_worker_set_am_recv_handler(both[i], &hp);
    hp.id = AM_BYE;
    hp.cb = am_bye_cb;
    ucp_worker_set_am_recv_handler(both[i], &hp);
  }
  *out = w;
  return 0;
fail_w:
  ucp_worker_destroy(w->cw);
  ucp_worker_destroy(w->w);
fail:
  free(w->conns);
  free(w->gens);
  free(w);
  return st;
}

void gw_worker_destroy(gw_worker_t *w) {
  if (!w) return;
  gw_worker_pump_stop(w);
  /* threads still waiting on the worker (a receive from any endpoint, an accept): their
   * receives fail, their waits end with GW_ERR_BAD_STATE, and the worker goes only once
   * none is inside (one that stays longer than 10 s keeps it: leaked, never freed under it) */
  LOCK(w);
  __atomic_store_n(&w->closing, 1, __ATOMIC_SEQ_CST);
  fail_pending(w, &w->any_pending, GW_ERR_BAD_STATE);
  wake_waiters(w);
  UNLOCK(w);
  for (int64_t t0 = now_ns(); __atomic_load_n(&w->n_inside, __ATOMIC_SEQ_CST);) {
    if (now_ns() - t0 > 10000000000LL) return;
    LOCK(w);
    wake_waiters(w);
    UNLOCK(w);
    usleep(1000);
  }
  pthread_cond_destroy(&w->pump_cv);
  /* UCX listeners first (UCX's own must go before its worker): requests queued or
   * handed out are rejected or left to fail, and a listener still referenced by a taken
   * request is marked gone (accepting it then fails without touching UCX) */
  pthread_mutex_lock(&g_lst);
  LOCK(w);
  if (w->ev_head) process_events(w);
  while (w->listeners) {
    gw_listener_t *l = w->listeners;
    w->listeners = l->lst_next;
    while (l->taken) { /* taken, neither accepted nor rejected: rejected now (accepting one
                        * later fails with GW_ERR_BAD_STATE, touching nothing) */
      gw_connreq_t *r = l->taken;
      l->taken = r->tnext;
      if (l->l) ucp_listener_reject(l->l, r->req);
      r->tprev = r->tnext = NULL;
      r->l = NULL;
      r->done = 1;
      l->refs--;
    }
    listener_teardown_locked(l);
    l->w = NULL;
    l->lst_prev = l->lst_next = NULL;
    if (l->user_closed && l->refs == 0 && l->accepting == 0) free(l);
  }
  UNLOCK(w);
  pthread_mutex_unlock(&g_lst);
  LOCK(w);
  for (uint32_t i = 1; i < MAX_CONNS; i++) {
    gw_conn_t *c = w->conns[i];
    if (!c) continue;
    conn_fail_pending(c, GW_ERR_BAD_STATE);
    pidfd_drop(c);
    ep_close(w, c->data_ep, c->data_arg, 1, 50000000LL, 1);
    ep_close(w, c->ctrl_ep, c->ctrl_arg, 1, 50000000LL, 1);
    if (c->welcome_req) {
      ucp_request_free(c->welcome_req);
      c->welcome_req = NULL;
      defer_free(w, c->welcome_blob); /* UCX may read it until the worker goes */
    }
    c->data_ep = c->ctrl_ep = NULL;
    c->data_arg = c->ctrl_arg = NULL;
    c->state = GW_CONN_CLOSED;
    w->conns[i] = NULL;
    if (!c->adopted) free(c); /* else the owner (Python) frees the struct */
  }
  for (int k = 0; k < 10; k++) {
    ucp_worker_progress(w->w);
    ucp_worker_progress(w->cw);
  }
  while (w->ev_head) { /* (no connection request among them: the listeners are gone) */
    gw_event_t *e = w->ev_head;
    w->ev_head = e->next;
    free(e);
  }
  ucp_worker_release_address(w->w, w->ucx_addr);
  ucp_worker_destroy(w->cw);
  ucp_worker_destroy(w->w);
  while (w->epargs) eparg_free(w->epargs); /* UCX destroyed what was left */
  for (int i = 0; i < w->n_deferred; i++) free(w->deferred[i]);
  free(w->deferred);
  UNLOCK(w);
  close(w->epfd);
  while (w->free_reqs) {
    gw_req_t *r = w->free_reqs;
    w->free_reqs = r->free_next;
    free((unsigned char *)r - w->ctx->req_size);
  }
  while (w->held_head) {
    gw_held_t *h = w->held_head;
    w->held_head = h->next;
    free(h);
  }
  free(w->addr);
  free(w->conns);
  free(w->gens);
  free(w->lost);
  free(w);
}

void gw_worker_set_spin(gw_worker_t *w, int64_t spin_ns) { w->spin_ns = spin_ns < 0 ? 0 : spin_ns; }
void gw_worker_set_call_spin_max(gw_worker_t *w, int64_t ns) {
  __atomic_store_n(&w->call_spin_max_ns, ns < 0 ? 0 : ns, __ATOMIC_RELAXED);
}
uint64_t gw_worker_blocked_total(gw_worker_t *w) {
  LOCK(w);
  uint64_t n = w->blocked_total;
  UNLOCK(w);
  return n;
}
int64_t gw_worker_call_hint(gw_worker_t *w) { return __atomic_load_n(&w->call_hint_ns, __ATOMIC_RELAXED); }
void gw_worker_set_rtt_emulation(gw_worker_t *w, int64_t rtt_ns) {
  w->rtt_half_ns = rtt_ns > 0 ? rtt_ns / 2 : 0;
}

int gw_worker_address(gw_worker_t *w, void *buf, size_t cap, size_t *len) {
  *len = w->addr_len;
  if (cap < w->addr_len) return UCS_ERR_BUFFER_TOO_SMALL;
  memcpy(buf, w->addr, w->addr_len);
  return 0;
}

int gw_worker_progress(gw_worker_t *w) {
  LOCK(w);
  int n = progress_locked(w);
  UNLOCK(w);
  return n;
}

int gw_worker_efd(gw_worker_t *w) { return w->epfd; }

/* Generic wait: spin progress until cond(arg) holds, then block. */
typedef int (*cond_fn)(void *arg);

/* this thread's wake-up eventfd (closed when the thread ends) */
static pthread_key_t efd_key;
static pthread_once_t efd_once = PTHREAD_ONCE_INIT;
static void efd_close(void *p) { close((int)(intptr_t)p - 1); }
static void efd_key_make(void) { pthread_key_create(&efd_key, efd_close); }
static int thread_efd(void) {
  pthread_once(&efd_once, efd_key_make);
  intptr_t v = (intptr_t)pthread_getspecific(efd_key);
  if (v) return (int)v - 1;
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return -1;
  pthread_setspecific(efd_key, (void *)(intptr_t)(fd + 1));
  return fd;
}

/* Arm the workers and sleep until an event, another thread's wake-up, or ns.
 * The condition is checked again under the lock after arming: completions
 * happen under the lock, so one that lands after this check finds this thread
 * registered as a waiter and writes its eventfd; none is missed. (UCX's own
 * ucp_worker_signal is not used: another thread's ucp_worker_arm drains it.) */
static void block_once(gw_worker_t *w, int64_t ns, cond_fn cond, void *arg) {
  int efd = thread_efd();
  uint64_t junk;
  gw_waiter_t me = {efd, NULL, NULL};
  LOCK(w);
  progress_ctrl_locked(w);
  ucs_status_t st = ucp_worker_arm(w->w);
  if (st == UCS_OK) st = ucp_worker_arm(w->cw);
  if (st != UCS_OK || cond(arg) || w->closing) { /* BUSY: events pending, go progress */
    UNLOCK(w);
    return;
  }
  if (efd >= 0) {
    ssize_t rc = read(efd, &junk, sizeof(junk)); /* stale wake-ups */
    (void)rc;
    me.next = w->waiters;
    if (w->waiters) w->waiters->prev = &me;
    w->waiters = &me;
  }
  w->n_blocked++;
  w->blocked_total++;
  UNLOCK(w);
  struct pollfd fds[2] = {{.fd = w->epfd, .events = POLLIN}, {.fd = efd, .events = POLLIN}};
  int ms = (int)((ns + 999999) / 1000000);
  if (ms > 100) ms = 100;
  poll(fds, efd >= 0 ? 2 : 1, ms);
  LOCK(w);
  w->n_blocked--;
  if (efd >= 0) {
    if (me.prev) me.prev->next = me.next;
    else w->waiters = me.next;
    if (me.next) me.next->prev = me.prev;
  }
  if (w->n_pidfds && (fds[0].revents & POLLIN)) check_liveness(w);
  UNLOCK(w);
}

static int wait_cond(gw_worker_t *w, cond_fn cond, void *arg, int64_t timeout_ns) {
  return wait_cond_spin(w, cond, arg, timeout_ns, w->spin_ns);
}

static int wait_cond_spin(gw_worker_t *w, cond_fn cond, void *arg, int64_t timeout_ns, int64_t spin_ns) {
  int64_t t0 = now_ns();
  int64_t deadline = deadline_after(t0, timeout_ns);
  int64_t spin_end = deadline_after(t0, spin_ns);
  unsigned it = 0;
  for (;;) {
    if (cond(arg)) return 0;
    if (w->pump_on && w->pump_n > 0) {
      /* the progress thread is moving big transfers: leave the worker to it (a waiter taking
       * the lock each pass would only slow it down; completions show in cond), and yield: it
       * may share this CPU (e.g. a process pinned to one core) */
      sched_yield();
    } else {
      LOCK(w);
      progress_locked(w);
      UNLOCK(w);
    }
    if (cond(arg)) return 0;
    if ((++it & 15) == 0 || spin_ns == 0) {
      if (w->closing) return GW_ERR_BAD_STATE;
      int64_t t = now_ns();
      if (t - w->last_live_check > LIVE_CHECK_NS) {
        w->last_live_check = t;
        LOCK(w);
        progress_ctrl_locked(w);
        check_liveness(w);
        UNLOCK(w);
        if (cond(arg)) return 0;
      }
      if (t >= deadline) return UCS_ERR_TIMED_OUT;
      if (t >= spin_end) {
        int64_t left = deadline - t;
        if (left > BLOCK_SLICE_NS) left = BLOCK_SLICE_NS;
        if (w->rtt_half_ns) { /* a held receive must show at its due time */
          w->held_due = INT64_MAX;
          if (cond(arg)) return 0; /* (re)computes held_due */
          if (w->held_due != INT64_MAX) {
            int64_t due = w->held_due - t;
            if (due <= 0) continue;
            if (due < left) left = due;
          }
        }
        block_once(w, left, cond, arg);
      }
    }
  }
}

static int cond_never(void *arg) {
  (void)arg;
  return 0;
}

/* ---------------------------------------------------------- progress thread */

static int cond_pump_idle(void *arg) {
  gw_worker_t *w = (gw_worker_t *)arg;
  return w->pump_n == 0 || w->pump_stop;
}

/* While pumped requests are in flight: progress passes, the lock given up
 * between passes (and left to any caller waiting for it); after spin_ns
 * without progress it blocks on the worker's events (1 ms slices) like a
 * waiter.  With none in flight it sleeps on pump_cv. */
static void *pump_main(void *arg) {
  gw_worker_t *w = (gw_worker_t *)arg;
  int64_t idle_since = 0, busy_at = 0;
  pthread_mutex_lock(&w->lock);
  while (!w->pump_stop) {
    if (w->pump_n <= 0) {
      if (busy_at && now_ns() - busy_at < w->spin_ns) {
        /* just drained: the next transfer (the next copy of a loop) is likely soon; stay
         * awake for spin_ns so its post needs no wake-up (a futex wake on its path) */
        pthread_mutex_unlock(&w->lock);
        sched_yield(); /* (spinning on a CPU another thread of this process may need) */
        while (__atomic_load_n(&w->lock_want, __ATOMIC_ACQUIRE)) sched_yield();
        pthread_mutex_lock(&w->lock);
        continue;
      }
      busy_at = 0;
      w->pump_sleeping = 1;
      pthread_cond_wait(&w->pump_cv, &w->lock);
      w->pump_sleeping = 0;
      idle_since = 0;
      continue;
    }
    int n = progress_locked(w);
    w->pump_passes++;
    busy_at = now_ns();
    pthread_mutex_unlock(&w->lock);
    if (n) {
      idle_since = 0;
    } else {
      int64_t t = now_ns();
      if (!idle_since) {
        idle_since = t;
      } else if (t - idle_since > w->spin_ns) {
        w->pump_blocks++;
        block_once(w, 1000000LL, cond_pump_idle, w);
        idle_since = 0;
      }
    }
    while (__atomic_load_n(&w->lock_want, __ATOMIC_ACQUIRE)) sched_yield();
    if (!n) sched_yield(); /* nothing moved: a caller on this CPU may have work for it */
    pthread_mutex_lock(&w->lock);
  }
  pthread_mutex_unlock(&w->lock);
  return NULL;
}

int gw_worker_pump_start(gw_worker_t *w, size_t min_bytes) {
  LOCK(w);
  w->pump_min = min_bytes;
  if (w->pump_started) {
    UNLOCK(w);
    return 0;
  }
  w->pump_stop = 0;
  w->pump_on = 1;
  int rc = pthread_create(&w->pump_th, NULL, pump_main, w);
  if (rc) {
    w->pump_on = 0;
    UNLOCK(w);
    return UCS_ERR_NO_RESOURCE;
  }
  w->pump_started = 1;
  UNLOCK(w);
  return 0;
}

void gw_worker_pump_stop(gw_worker_t *w) {
  LOCK(w);
  if (!w->pump_started) {
    UNLOCK(w);
    return;
  }
  w->pump_stop = 1;
  pthread_cond_signal(&w->pump_cv);
  wake_waiters(w); /* (it may be blocked in poll) */
  pthread_t th = w->pump_th;
  UNLOCK(w);
  pthread_join(th, NULL);
  LOCK(w);
  w->pump_started = 0;
  w->pump_on = 0;
  w->pump_stop = 0;
  UNLOCK(w);
}

void gw_worker_pump_stats(gw_worker_t *w, int *running, int *in_flight, uint64_t *passes,
                          uint64_t *blocks, uint64_t *reqs) {
  LOCK(w);
  *running = w->pump_started;
  *in_flight = w->pump_n;
  *passes = w->pump_passes;
  *blocks = w->pump_blocks;
  *reqs = w->pump_reqs;
  UNLOCK(w);
}

static int worker_wait_event(gw_worker_t *w, int64_t timeout_ns) {
  int64_t deadline = deadline_after(now_ns(), timeout_ns);
  int64_t spin_end = deadline_after(now_ns(), w->spin_ns);
  for (;;) {
    if (w->closing) return 0;
    LOCK(w);
    int n = progress_locked(w) + progress_ctrl_locked(w);
    UNLOCK(w);
    if (n) return 1;
    int64_t t = now_ns();
    if (t >= deadline) return 0;
    if (t >= spin_end)
      block_once(w, deadline - t < BLOCK_SLICE_NS ? deadline - t : BLOCK_SLICE_NS, cond_never,
                 NULL);
  }
}

int gw_worker_wait_event(gw_worker_t *w, int64_t timeout_ns) {
  if (worker_enter(w)) return 0;
  int rc = worker_wait_event(w, timeout_ns);
  worker_leave(w);
  return rc;
}

int gw_worker_poll_lost(gw_worker_t *w, uint32_t *ids, int cap) {
  LOCK(w);
  int n = w->lost_n < cap ? w->lost_n : cap;
  memcpy(ids, w->lost, n * sizeof(uint32_t));
  memmove(w->lost, w->lost + n, (w->lost_n - n) * sizeof(uint32_t));
  w->lost_n -= n;
  UNLOCK(w);
  return n;
}

/* ---------------------------------------------------------------- listener */

static int make_sockaddr(const char *ip, int port, struct sockaddr_storage *ss, socklen_t *len) {
  memset(ss, 0, sizeof(*ss));
  if (strchr(ip, ':')) {
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons((uint16_t)port);
    if (inet_pton(AF_INET6, ip, &s6->sin6_addr) != 1) return UCS_ERR_INVALID_ADDR;
    *len = sizeof(*s6);
  } else {
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    s4->sin_family = AF_INET;
    s4->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, ip, &s4->sin_addr) != 1) return UCS_ERR_INVALID_ADDR;
    *len = sizeof(*s4);
  }
  return 0;
}

int gw_listen(gw_worker_t *w, const char *ip, int port, gw_listener_t **out) {
  return gw_listen_mode(w, ip, port, 0, out);
}

int gw_listen_mode(gw_worker_t *w, const char *ip, int port, int handoff, gw_listener_t **out) {
  if (port < 0 || port > 65535) return UCS_ERR_INVALID_PARAM;
  struct sockaddr_storage ss;
  socklen_t sl;
  int rc = make_sockaddr(ip, port, &ss, &sl);
  if (rc) return rc;
  gw_listener_t *l = calloc(1, sizeof(*l));
  if (!l) return UCS_ERR_NO_MEMORY;
  l->w = w;
  l->handoff = handoff != 0;
  ucp_listener_params_t p;
  memset(&p, 0, sizeof(p));
  p.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  p.sockaddr.addr = (struct sockaddr *)&ss;
  p.sockaddr.addrlen = sl;
  p.conn_handler.cb = conn_req_cb;
  p.conn_handler.arg = l;
  pthread_mutex_lock(&g_lst);
  LOCK(w);
  ucs_status_t st = ucp_listener_create(w->cw, &p, &l->l);
  if (st == UCS_OK) {
    ucp_listener_attr_t a;
    a.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    if (ucp_listener_query(l->l, &a) == UCS_OK) {
      if (a.sockaddr.ss_family == AF_INET6)
        l->port = ntohs(((struct sockaddr_in6 *)&a.sockaddr)->sin6_port);
      else
        l->port = ntohs(((struct sockaddr_in *)&a.sockaddr)->sin_port);
    }
    l->lst_next = w->listeners;
    if (w->listeners) w->listeners->lst_prev = l;
    w->listeners = l;
  }
  UNLOCK(w);
  pthread_mutex_unlock(&g_lst);
  if (st != UCS_OK) {
    free(l);
    return st;
  }
  *out = l;
  return 0;
}

int gw_listener_port(gw_listener_t *l) { return l->port; }

/* worker lock held: requests that came in are handled (a closed listener rejects them),
 * queued ones rejected, and UCX's listener destroyed */
static void listener_teardown_locked(gw_listener_t *l) {
  gw_worker_t *w = l->w;
  l->closed = 1;
  progress_ctrl_locked(w);
  while (l->rq_head) {
    gw_connreq_t *r = l->rq_head;
    l->rq_head = r->next;
    if (l->l) ucp_listener_reject(l->l, r->req);
    free(r);
  }
  l->rq_tail = NULL;
  if (l->l) {
    ucp_listener_destroy(l->l);
    l->l = NULL;
  }
}

/* g_lst held: free the struct once nothing refers to it any more */
static void listener_maybe_free(gw_listener_t *l) {
  if (!l->user_closed || l->refs || l->accepting) return;
  gw_worker_t *w = l->w;
  if (w) {
    if (l->lst_prev) l->lst_prev->lst_next = l->lst_next;
    else w->listeners = l->lst_next;
    if (l->lst_next) l->lst_next->lst_prev = l->lst_prev;
  }
  free(l);
}

void gw_listener_close(gw_listener_t *l) {
  if (!l) return;
  pthread_mutex_lock(&g_lst);
  if (l->user_closed) {
    pthread_mutex_unlock(&g_lst);
    return;
  }
  l->user_closed = 1;
  gw_worker_t *w = l->w;
  if (w) {
    LOCK(w);
    if (l->refs == 0) {
      listener_teardown_locked(l);
    } else { /* a taken request still needs UCX's listener: destroyed at its release */
      l->closed = 1;
      progress_ctrl_locked(w);
      while (l->rq_head) {
        gw_connreq_t *r = l->rq_head;
        l->rq_head = r->next;
        ucp_listener_reject(l->l, r->req);
        free(r);
      }
      l->rq_tail = NULL;
    }
    /* conns accepted but never taken stay owned by the worker */
    for (uint32_t i = 1; i < MAX_CONNS; i++)
      if (w->conns[i] && w->conns[i]->listener == l) w->conns[i]->listener = NULL;
    /* threads in gw_accept / gw_listener_take on it end with GW_ERR_BAD_STATE */
    if (l->accepting) wake_waiters(w);
    UNLOCK(w);
  }
  l->closed = 1;
  listener_maybe_free(l);
  pthread_mutex_unlock(&g_lst);
}

/* a thread enters / leaves gw_accept or gw_listener_take: the struct stays meanwhile */
static int listener_enter(gw_listener_t *l) {
  pthread_mutex_lock(&g_lst);
  int closed = l->closed || !l->w;
  if (!closed) l->accepting++;
  pthread_mutex_unlock(&g_lst);
  return closed;
}

static void listener_leave(gw_listener_t *l) {
  pthread_mutex_lock(&g_lst);
  l->accepting--;
  listener_maybe_free(l);
  pthread_mutex_unlock(&g_lst);
}

typedef struct {
  gw_conn_t **head;
  gw_listener_t *l; /* NULL: the worker's address queue */
} q_arg_t;

/* the queue head is ready once its WELCOME has been flushed out (or the listener closed) */
static int cond_queue(void *arg) {
  q_arg_t *a = (q_arg_t *)arg;
  if (a->l && a->l->closed) return 1;
  gw_conn_t *c = *a->head;
  if (!c) return 0;
  return !c->welcome_req || ucp_request_check_status(c->welcome_req) != UCS_INPROGRESS;
}

/* an accepted connection goes to its caller (lock held): its WELCOME has been sent, and
 * the caller frees the struct from now on */
static void conn_hand_out(gw_conn_t *c) {
  if (c->welcome_req) {
    ucp_request_free(c->welcome_req);
    free(c->welcome_blob);
    c->welcome_req = c->welcome_blob = NULL;
  }
  c->adopted = 1;
}

static int accept_from(gw_worker_t *w, gw_conn_t **head, gw_conn_t **tail, gw_listener_t *l,
                       int64_t timeout_ns, gw_conn_t **out) {
  q_arg_t a = {head, l};
  int64_t deadline = deadline_after(now_ns(), timeout_ns);
  gw_conn_t *c;
  for (;;) { /* (another thread may take the head first: wait again) */
    int64_t left = deadline == INT64_MAX ? -1 : deadline - now_ns();
    if (left < 0 && deadline != INT64_MAX) left = 0;
    __atomic_fetch_add(&w->ctrl_hot, 1, __ATOMIC_RELAXED);
    int rc = wait_cond(w, cond_queue, &a, left);
    __atomic_fetch_sub(&w->ctrl_hot, 1, __ATOMIC_RELAXED);
    if (rc) return rc;
    LOCK(w);
    if (l && l->closed) {
      UNLOCK(w);
      return GW_ERR_BAD_STATE;
    }
    if (cond_queue(&a)) break;
    UNLOCK(w);
  }
  c = *head;
  *head = c->accept_next;
  if (!*head) *tail = NULL;
  conn_hand_out(c);
  UNLOCK(w);
  *out = c;
  return 0;
}

int gw_accept(gw_listener_t *l, int64_t timeout_ns, gw_conn_t **out) {
  if (l->handoff) return UCS_ERR_INVALID_PARAM; /* gw_listener_take + gw_connreq_accept */
  gw_worker_t *w = l->w;
  if (!w || worker_enter(w)) return GW_ERR_BAD_STATE;
  if (listener_enter(l)) {
    worker_leave(w);
    return GW_ERR_BAD_STATE;
  }
  int rc = accept_from(w, &l->q_head, &l->q_tail, l, timeout_ns, out);
  listener_leave(l);
  worker_leave(w);
  return rc;
}

/* ------------------------------------------------------- handoff requests */

static int cond_rq(void *arg) {
  gw_listener_t *l = (gw_listener_t *)arg;
  return l->closed || l->rq_head != NULL;
}

int gw_listener_take(gw_listener_t *l, int64_t timeout_ns, gw_connreq_t **out) {
  *out = NULL;
  if (!l->handoff) return UCS_ERR_INVALID_PARAM;
  gw_worker_t *w = l->w;
  if (!w || worker_enter(w)) return GW_ERR_BAD_STATE;
  if (listener_enter(l)) {
    worker_leave(w);
    return GW_ERR_BAD_STATE;
  }
  int64_t deadline = deadline_after(now_ns(), timeout_ns);
  int rc;
  for (;;) { /* (another thread may take the head first: wait again) */
    int64_t left = deadline == INT64_MAX ? -1 : deadline - now_ns();
    if (left < 0 && deadline != INT64_MAX) left = 0;
    __atomic_fetch_add(&w->ctrl_hot, 1, __ATOMIC_RELAXED);
    rc = wait_cond(w, cond_rq, l, left);
    __atomic_fetch_sub(&w->ctrl_hot, 1, __ATOMIC_RELAXED);
    if (rc) break;
    pthread_mutex_lock(&g_lst);
    LOCK(w);
    gw_connreq_t *r = NULL;
    if (l->closed) {
      rc = GW_ERR_BAD_STATE;
    } else if ((r = l->rq_head) != NULL) {
      l->rq_head = r->next;
      if (!l->rq_head) l->rq_tail = NULL;
      r->next = NULL;
      r->l = l;
      l->refs++;
      r->tnext = l->taken;
      if (l->taken) l->taken->tprev = r;
      l->taken = r;
    }
    UNLOCK(w);
    pthread_mutex_unlock(&g_lst);
    if (rc || r) {
      *out = r;
      break;
    }
  }
  listener_leave(l);
  worker_leave(w);
  return rc;
}

/* g_lst held, no worker lock: the request is resolved; the listener's last reference
 * destroys a closed listener's UCX listener and may free the struct */
static void connreq_release(gw_connreq_t *r) {
  gw_listener_t *l = r->l;
  r->l = NULL;
  r->done = 1;
  if (!l) return;
  if (r->tprev) r->tprev->tnext = r->tnext;
  else l->taken = r->tnext;
  if (r->tnext) r->tnext->tprev = r->tprev;
  r->tprev = r->tnext = NULL;
  l->refs--;
  if (l->refs == 0 && l->closed && l->w && l->l) {
    gw_worker_t *lw = l->w;
    LOCK(lw);
    listener_teardown_locked(l);
    UNLOCK(lw);
  }
  listener_maybe_free(l);
}

void gw_connreq_reject(gw_connreq_t *r) {
  if (!r) return;
  pthread_mutex_lock(&g_lst);
  if (!r->done) {
    gw_listener_t *l = r->l;
    if (l && l->w && l->l) {
      LOCK(l->w);
      ucp_listener_reject(l->l, r->req);
      UNLOCK(l->w);
    }
    connreq_release(r);
  }
  pthread_mutex_unlock(&g_lst);
}

void gw_connreq_free(gw_connreq_t *r) {
  if (!r) return;
  gw_connreq_reject(r);
  free(r);
}

int gw_connreq_client(gw_connreq_t *r, char *buf, size_t len) {
  snprintf(buf, len, "%s", r->client);
  return 0;
}

/* the handshake of an accepted request settled: up with its WELCOME out, or lost */
static int cond_handoff_settled(void *arg) {
  gw_conn_t *c = (gw_conn_t *)arg;
  if (c->state == GW_CONN_CONNECTING) return 0;
  if (c->state != GW_CONN_UP) return 1;
  return !c->welcome_req || ucp_request_check_status(c->welcome_req) != UCS_INPROGRESS;
}

/* a half-made conn of w (its handshake failed or timed out): closed and freed */
static void conn_discard(gw_worker_t *w, gw_conn_t *c) {
  LOCK(w);
  ep_close(w, c->data_ep, c->data_arg, 1, 200000000LL, 1);
  ep_close(w, c->ctrl_ep, c->ctrl_arg, 1, 200000000LL, 1);
  c->data_ep = c->ctrl_ep = NULL;
  c->data_arg = c->ctrl_arg = NULL;
  if (c->welcome_req) {
    ucp_request_free(c->welcome_req);
    defer_free(w, c->welcome_blob); /* UCX may read it until the worker goes */
    c->welcome_req = c->welcome_blob = NULL;
  }
  pidfd_drop(c);
  c->state = GW_CONN_CLOSED;
  w->conns[c->id & 0xFFFF] = NULL;
  progress_locked(w);
  UNLOCK(w);
  free(c);
}

int gw_connreq_accept(gw_connreq_t *r, gw_worker_t *w, int64_t timeout_ns, gw_conn_t **out) {
  *out = NULL;
  if (!r || !w) return UCS_ERR_INVALID_PARAM;
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  pthread_mutex_lock(&g_lst);
  gw_listener_t *l = r->l;
  if (r->done || !l || !l->w || !l->l) { /* resolved, or the listener's worker is gone */
    if (!r->done) connreq_release(r);
    pthread_mutex_unlock(&g_lst);
    worker_leave(w);
    return GW_ERR_BAD_STATE;
  }
  gw_worker_t *lw = l->w;
  if (lw->ctx != w->ctx) {
    pthread_mutex_unlock(&g_lst);
    worker_leave(w);
    return UCS_ERR_INVALID_PARAM;
  }
  /* lock order: g_lst, then the accepting worker, then the listener's */
  LOCK(w);
  if (lw != w) LOCK(lw);
  ucs_status_t st = UCS_OK;
  gw_conn_t *c = conn_new(w);
  if (c) {
    c->via_sockaddr = 1;
    c->handoff = 1;
    c->ctrl_arg = eparg_new(c, 1);
  }
  if (!c || !c->ctrl_arg) {
    st = UCS_ERR_NO_MEMORY;
    ucp_listener_reject(l->l, r->req);
  } else {
    st = ctrl_ep_accept(w, c, r->req); /* (UCX consumes the request either way) */
  }
  if (lw != w) UNLOCK(lw);
  if (st != UCS_OK && c) {
    eparg_free(c->ctrl_arg);
    w->conns[c->id & 0xFFFF] = NULL;
    free(c);
    c = NULL;
  }
  UNLOCK(w);
  connreq_release(r);
  pthread_mutex_unlock(&g_lst);
  if (st != UCS_OK) {
    worker_leave(w);
    return st;
  }
  /* the handshake runs on w: the client's HELLO comes to w's control worker, and the
   * WELCOME carries w's data-worker address */
  __atomic_fetch_add(&w->ctrl_hot, 1, __ATOMIC_RELAXED);
  int rc = wait_cond(w, cond_handoff_settled, c, timeout_ns);
  __atomic_fetch_sub(&w->ctrl_hot, 1, __ATOMIC_RELAXED);
  if (rc == 0 && c->state == GW_CONN_UP) {
    LOCK(w);
    conn_hand_out(c);
    UNLOCK(w);
    worker_leave(w);
    *out = c;
    return 0;
  }
  int fail = rc ? rc : (c->lost_status ? c->lost_status : GW_ERR_CONN_LOST);
  conn_discard(w, c);
  worker_leave(w);
  return fail;
}

int gw_accept_any(gw_worker_t *w, int64_t timeout_ns, gw_conn_t **out) {
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = accept_from(w, &w->addr_q_head, &w->addr_q_tail, NULL, timeout_ns, out);
  worker_leave(w);
  return rc;
}

/* ----------------------------------------------------------------- connect */

static int cond_conn_settled(void *arg) {
  return ((gw_conn_t *)arg)->state != GW_CONN_CONNECTING;
}

static int connect_finish(gw_worker_t *w, gw_conn_t *c, int64_t timeout_ns, gw_conn_t **out) {
  __atomic_fetch_add(&w->ctrl_hot, 1, __ATOMIC_RELAXED);
  int rc = wait_cond(w, cond_conn_settled, c, timeout_ns);
  __atomic_fetch_sub(&w->ctrl_hot, 1, __ATOMIC_RELAXED);
  if (rc == 0 && c->state == GW_CONN_UP) {
    c->adopted = 1;
    *out = c;
    return 0;
  }
  int st = rc ? rc : (c->lost_status ? c->lost_status : GW_ERR_CONN_LOST);
  LOCK(w);
  ep_close(w, c->data_ep, c->data_arg, 1, 200000000LL, 1);
  ep_close(w, c->ctrl_ep, c->ctrl_arg, 1, 200000000LL, 1);
  pidfd_drop(c);
  w->conns[c->id & 0xFFFF] = NULL;
  progress_locked(w);
  UNLOCK(w);
  free(c);
  return st;
}

static int connect_impl(gw_worker_t *w, const char *ip, int port, int64_t timeout_ns, gw_conn_t **out) {
  if (port <= 0 || port > 65535) return UCS_ERR_INVALID_PARAM;
  struct sockaddr_storage ss;
  socklen_t sl;
  int rc = make_sockaddr(ip, port, &ss, &sl);
  if (rc) return rc;
  LOCK(w);
  gw_conn_t *c = conn_new(w);
  if (!c) {
    UNLOCK(w);
    return UCS_ERR_EXCEEDS_LIMIT;
  }
  c->is_client = 1;
  c->via_sockaddr = 1;
  ucp_ep_params_t ep;
  memset(&ep, 0, sizeof(ep));
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                  UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = (struct sockaddr *)&ss;
  ep.sockaddr.addrlen = sl;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = ep_err_cb;
  ep.err_handler.arg = c->ctrl_arg = eparg_new(c, 1);
  ucs_status_t st = c->ctrl_arg ? ucp_ep_create(w->cw, &ep, &c->ctrl_ep) : UCS_ERR_NO_MEMORY;
  if (st != UCS_OK) {
    eparg_free(c->ctrl_arg);
    w->conns[c->id & 0xFFFF] = NULL;
    UNLOCK(w);
    free(c);
    return st;
  }
  c->hello_out = w->self;
  c->hello_out.sender_id = c->id;
  c->hello_out.via_sockaddr = 1;
  c->hello_out.addr_len = (uint32_t)w->ucx_addr_len;
  am_send(c->ctrl_ep, AM_HELLO, &c->hello_out, sizeof(gw_hello_t), w->ucx_addr,
          w->ucx_addr_len, 1);
  UNLOCK(w);
  return connect_finish(w, c, timeout_ns, out);
}

static int connect_address_impl(gw_worker_t *w, const void *addr, size_t len, int64_t timeout_ns,
                                gw_conn_t **out) {
  gw_addr_hdr_t ah;
  if (len < sizeof(ah)) return UCS_ERR_INVALID_ADDR;
  memcpy(&ah, addr, sizeof(ah));
  if (ah.magic != GW_MAGIC || ah.proto != GW_PROTO || sizeof(ah) + ah.ucx_len != len)
    return UCS_ERR_INVALID_ADDR;
  gw_hello_t peer;
  memset(&peer, 0, sizeof(peer));
  memcpy(peer.boot_id, ah.boot_id, sizeof(ah.boot_id));
  peer.ipc_ns = ah.ipc_ns;
  peer.pid_ns = ah.pid_ns;
  LOCK(w);
  gw_conn_t *c = conn_new(w);
  if (!c) {
    UNLOCK(w);
    return UCS_ERR_EXCEEDS_LIMIT;
  }
  c->is_client = 1;
  c->data_ep = make_addr_ep(c, (const unsigned char *)addr + sizeof(ah), data_err_none(c, &peer));
  if (!c->data_ep) {
    w->conns[c->id & 0xFFFF] = NULL;
    UNLOCK(w);
    free(c);
    return UCS_ERR_UNREACHABLE;
  }
  c->hello_out = w->self;
  c->hello_out.sender_id = c->id;
  c->hello_out.addr_len = (uint32_t)w->ucx_addr_len;
  am_send(c->data_ep, AM_HELLO, &c->hello_out, sizeof(gw_hello_t), w->ucx_addr,
          w->ucx_addr_len, 0);
  UNLOCK(w);
  return connect_finish(w, c, timeout_ns, out);
}

int gw_connect(gw_worker_t *w, const char *ip, int port, int64_t timeout_ns, gw_conn_t **out) {
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = connect_impl(w, ip, port, timeout_ns, out);
  worker_leave(w);
  return rc;
}

int gw_connect_address(gw_worker_t *w, const void *addr, size_t len, int64_t timeout_ns,
                       gw_conn_t **out) {
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = connect_address_impl(w, addr, len, timeout_ns, out);
  worker_leave(w);
  return rc;
}

int gw_conn_close(gw_conn_t *c, int64_t timeout_ns) { return gw_conn_close_mode(c, timeout_ns, 0); }

int gw_conn_close_mode(gw_conn_t *c, int64_t timeout_ns, int force) {
  if (!c || c->state == GW_CONN_CLOSED) return 0; /* also after the worker is gone */
  gw_worker_t *w = c->w;
  LOCK(w);
  if (c->state == GW_CONN_CLOSED) {
    UNLOCK(w);
    return 0;
  }
  /* learn first whether the peer is gone: a flush towards a dead peer only waits */
  progress_ctrl_locked(w);
  check_liveness(w);
  int was_up = c->state == GW_CONN_UP;
  conn_fail_pending(c, GW_ERR_BAD_STATE);
  pidfd_drop(c);
  /* BYE: on the control endpoint after the data endpoint's close (flush), so a peer
   * that has our BYE has everything we sent and may close its side at once (a side
   * that closes, or goes, while the other's flush close runs can make that flush fail,
   * which UCX logs as an error); without a control endpoint, on the data one first */
  int bye_later = 0;
  if (was_up) {
    uint32_t rid = c->remote_id;
    c->hello_out.receiver_id = rid; /* stable storage for the BYE header */
    if (c->ctrl_ep)
      bye_later = 1;
    else
      am_send(c->data_ep, AM_BYE, &c->hello_out.receiver_id, sizeof(uint32_t), NULL, 0, 0);
  }
  c->state = GW_CONN_CLOSED;
  w->conns[c->id & 0xFFFF] = NULL;
  ucp_ep_h data = c->data_ep, ctrl = c->ctrl_ep;
  gw_eparg_t *da = c->data_arg, *ca = c->ctrl_arg;
  c->data_ep = c->ctrl_ep = NULL;
  c->data_arg = c->ctrl_arg = NULL;
  UNLOCK(w);
  int64_t per = timeout_ns < 0 ? 1000000000LL : timeout_ns / 2;
  /* a lost conn: its peer is gone, so a flush could only wait in vain */
  if (!was_up && per > LOST_CLOSE_NS) per = LOST_CLOSE_NS;
  if (force && data && da && !da->peer_mode) {
    /* UCX cannot force a mode-NONE endpoint and its flush close fails (and logs an
     * error) once the peer's side is gone: leave it to ucp_worker_destroy, which
     * releases it without a flush (its arg is freed with the worker) */
    da->conn_id = 0; /* no more error events for the conn */
    data = NULL;
    da = NULL;
  }
  ep_close(w, data, da, force || !was_up, per, 0);
  if (bye_later) {
    /* the BYE, waited for; then the control endpoint closes forced (mode PEER): its
     * flush close would wait for the peer's side of UCX's disconnect, which a peer
     * that closes its side forced on our BYE never sends */
    LOCK(w);
    ucp_request_param_t bp;
    memset(&bp, 0, sizeof(bp));
    void *r = ucp_am_send_nbx(ctrl, AM_BYE, &c->hello_out.receiver_id, sizeof(uint32_t), NULL, 0,
                              &bp);
    if (UCS_PTR_IS_PTR(r)) {
      int64_t end = deadline_after(now_ns(), per);
      while (ucp_request_check_status(r) == UCS_INPROGRESS && now_ns() < end)
        ucp_worker_progress(w->cw);
      if (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_request_cancel(w->cw, r);
      ucp_request_free(r);
    }
    UNLOCK(w);
  }
  ep_close(w, ctrl, ca, force || !was_up || bye_later, per, 0);
  return 0;
}

void gw_conn_free(gw_conn_t *c) {
  if (!c) return;
  if (c->state != GW_CONN_CLOSED) gw_conn_close(c, 0);
  free(c);
}

int gw_conn_state(gw_conn_t *c) { return c->state; }
int gw_conn_lost_status(gw_conn_t *c) { return c->lost_status; }
uint32_t gw_conn_id(gw_conn_t *c) { return c->id; }
uint32_t gw_conn_remote_id(gw_conn_t *c) { return c->remote_id; }

void gw_conn_debug_set_remote_id(gw_conn_t *c, uint32_t id) {
  if (!c || c->state == GW_CONN_CLOSED) return;
  LOCK(c->w);
  c->remote_id = id;
  UNLOCK(c->w);
}
int gw_conn_peer_pid(gw_conn_t *c) { return c->peer_pid; }

int gw_conn_peer(gw_conn_t *c, char *buf, size_t len) {
  snprintf(buf, len, "%s", c->peer);
  return 0;
}

static int ep_transports(ucp_ep_h ep, char *buf, size_t len) {
  ucp_transport_entry_t ents[16];
  ucp_ep_attr_t a;
  memset(&a, 0, sizeof(a));
  a.field_mask = UCP_EP_ATTR_FIELD_TRANSPORTS;
  a.transports.entries = ents;
  a.transports.num_entries = 16;
  a.transports.entry_size = sizeof(ucp_transport_entry_t);
  buf[0] = 0;
  if (ucp_ep_query(ep, &a) != UCS_OK) return -1;
  size_t off = 0;
  for (unsigned i = 0; i < a.transports.num_entries && off < len; i++)
    off += snprintf(buf + off, len - off, "%s%s/%s", i ? "," : "", ents[i].transport_name,
                    ents[i].device_name);
  return 0;
}

int gw_conn_transports(gw_conn_t *c, char *buf, size_t len) {
  buf[0] = 0;
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  LOCK(w);
  int rc = c->data_ep ? ep_transports(c->data_ep, buf, len) : -1;
  UNLOCK(w);
  return rc;
}

/* ---------------------------------------------------------------- messages */

static inline int conn_usable(gw_conn_t *c) {
  if (c->state == GW_CONN_UP) return 0;
  if (c->state == GW_CONN_LOST) return GW_ERR_CONN_LOST;
  return GW_ERR_BAD_STATE;
}

/* post a tagged send; caller holds the lock */
static int send_locked(gw_conn_t *c, uint32_t tag, const void *hdr, size_t hlen, const void *buf,
                       size_t len, gw_req_t *r) {
  ucp_request_param_t p;
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_REQUEST;
  p.cb.send = send_cb;
  p.request = r;
  uint64_t t = ((uint64_t)c->remote_id << 32) | ((uint64_t)hlen << 24) | (tag & TAG_USER_MASK);
  const void *data = buf;
  size_t count = len;
  if (hlen && len) {
    r->iov[0].buffer = (void *)hdr;
    r->iov[0].length = hlen;
    r->iov[1].buffer = (void *)buf;
    r->iov[1].length = len;
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    p.datatype = ucp_dt_make_iov();
    data = r->iov;
    count = 2;
  } else if (hlen) {
    data = hdr;
    count = hlen;
  }
  ucs_status_ptr_t sp = ucp_tag_send_nbx(c->data_ep, data, count, t, &p);
  if (sp == NULL) {
    r->done = 1;
    r->status = 0;
    return 0;
  }
  if (UCS_PTR_IS_ERR(sp)) {
    r->done = 1;
    r->status = UCS_PTR_STATUS(sp);
    return r->status;
  }
  r->ucx_busy = 1;
  req_link(&c->pending, r);
  pump_note(c->w, r, len);
  return 1;
}

/* emulated RTT: keep a received message whose receive is released before it showed (lock
 * held); the next matching receive takes it, and it shows at its original due time */
static void held_keep(gw_worker_t *w, gw_req_t *r) {
  size_t n = r->length < r->rcap ? r->length : r->rcap;
  gw_held_t *h = malloc(sizeof(*h) + n);
  if (!h) return;
  h->next = NULL;
  h->sender_tag = r->sender_tag;
  h->length = n;
  h->t_done = r->t_done;
  if (n) memcpy(h->data, r->rbuf, n);
  if (w->held_tail) w->held_tail->next = h;
  else w->held_head = h;
  w->held_tail = h;
}

static int held_take(gw_worker_t *w, uint64_t t, uint64_t m, gw_req_t *r) {
  gw_held_t *prev = NULL;
  for (gw_held_t *h = w->held_head; h; prev = h, h = h->next) {
    if ((h->sender_tag & m) != (t & m)) continue;
    if (prev) prev->next = h->next;
    else w->held_head = h->next;
    if (w->held_tail == h) w->held_tail = prev;
    size_t n = h->length < r->rcap ? h->length : r->rcap;
    if (n) memcpy(r->rbuf, h->data, n);
    r->length = h->length;
    r->sender_tag = h->sender_tag;
    r->t_done = h->t_done;
    r->status = h->length > r->rcap ? GW_ERR_TRUNCATED : 0;
    r->done = 1;
    free(h);
    return 1;
  }
  return 0;
}

static int recv_locked(gw_worker_t *w, gw_conn_t *c, uint32_t tag, uint32_t tag_mask, void *buf,
                       size_t cap, gw_req_t *r) {
  ucp_request_param_t p;
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_REQUEST |
                   UCP_OP_ATTR_FIELD_RECV_INFO;
  p.cb.recv = recv_cb;
  p.request = r;
  p.recv_info.tag_info = &r->info;
  uint64_t t = tag & TAG_USER_MASK, m = tag_mask & TAG_USER_MASK;
  if (c) {
    t |= (uint64_t)c->id << 32;
    m |= TAG_CONN_MASK;
  }
  r->is_recv = 1;
  r->rbuf = buf;
  r->rcap = cap;
  if (w->held_head && held_take(w, t, m, r)) return r->status;
  ucs_status_ptr_t sp = ucp_tag_recv_nbx(w->w, buf, cap, t, m, &p);
  if (UCS_PTR_IS_ERR(sp)) {
    r->done = 1;
    r->status = UCS_PTR_STATUS(sp);
    if (r->status == UCS_ERR_MESSAGE_TRUNCATED) r->status = GW_ERR_TRUNCATED;
    return r->status;
  }
  if (sp == NULL) {
    r->done = 1;
    r->status = 0;
    r->length = r->info.length;
    r->sender_tag = r->info.sender_tag;
    if (w->rtt_half_ns) r->t_done = now_ns();
    return 0;
  }
  r->ucx_busy = 1;
  req_link(c ? &c->pending : &w->any_pending, r);
  pump_note(w, r, cap);
  return 1;
}

int gw_send(gw_conn_t *c, uint32_t tag, const void *hdr, size_t hlen, const void *buf,
            size_t len, gw_req_t **out) {
  *out = NULL;
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  if (hlen > 255) return UCS_ERR_INVALID_PARAM;
  LOCK(w);
  int rc = conn_usable(c);
  if (rc) {
    UNLOCK(w);
    return rc;
  }
  gw_req_t *r = req_get(w);
  if (!r) {
    UNLOCK(w);
    return UCS_ERR_NO_MEMORY;
  }
  rc = send_locked(c, tag, hdr, hlen, buf, len, r);
  if (rc < 0) {
    req_put(w, r);
    UNLOCK(w);
    return rc;
  }
  UNLOCK(w);
  *out = r;
  return rc;
}

int gw_recv(gw_worker_t *w, gw_conn_t *c, uint32_t tag, uint32_t tag_mask, void *buf,
            size_t cap, gw_req_t **out) {
  *out = NULL;
  if (c) RETURN_IF_CLOSED(c);
  LOCK(w);
  if (c) {
    int rc = conn_usable(c);
    if (rc) {
      UNLOCK(w);
      return rc;
    }
  }
  gw_req_t *r = req_get(w);
  if (!r) {
    UNLOCK(w);
    return UCS_ERR_NO_MEMORY;
  }
  int rc = recv_locked(w, c, tag, tag_mask, buf, cap, r);
  if (rc < 0 && rc != GW_ERR_TRUNCATED) {
    req_put(w, r);
    UNLOCK(w);
    return rc;
  }
  UNLOCK(w);
  *out = r;
  return rc < 0 ? 0 : rc;
}

int gw_req_test(gw_req_t *r) {
  if (!r->done) return 0;
  gw_worker_t *w = r->w;
  if (w->rtt_half_ns && r->is_recv) {
    int64_t due = r->t_done + w->rtt_half_ns;
    if (now_ns() < due) {
      if (due < w->held_due) w->held_due = due;
      return 0;
    }
  }
  return 1;
}

static int cond_req(void *arg) { return gw_req_test((gw_req_t *)arg); }

int gw_wait(gw_worker_t *w, gw_req_t *r, int64_t timeout_ns) {
  if (!r) return UCS_ERR_INVALID_PARAM;
  if (gw_req_test(r)) return r->status;
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = wait_cond(w, cond_req, r, timeout_ns);
  worker_leave(w);
  return rc ? rc : r->status;
}

typedef struct {
  gw_req_t **reqs;
  int n;
  int any;
  int idx;
} multi_arg_t;

static int cond_multi(void *arg) {
  multi_arg_t *a = (multi_arg_t *)arg;
  for (int i = 0; i < a->n; i++) {
    int d = gw_req_test(a->reqs[i]);
    if (a->any && d) {
      a->idx = i;
      return 1;
    }
    if (!a->any && !d) return 0;
  }
  return !a->any;
}

static int reqs_valid(gw_req_t **reqs, int n) {
  for (int i = 0; i < n; i++)
    if (!reqs[i]) return 0;
  return 1;
}

int gw_wait_all(gw_worker_t *w, gw_req_t **reqs, int n, int64_t timeout_ns) {
  if (n < 0 || !reqs_valid(reqs, n)) return UCS_ERR_INVALID_PARAM;
  multi_arg_t a = {reqs, n, 0, -1};
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = wait_cond(w, cond_multi, &a, timeout_ns);
  worker_leave(w);
  if (rc) return rc;
  for (int i = 0; i < n; i++)
    if (reqs[i]->status) return reqs[i]->status;
  return 0;
}

int gw_wait_any(gw_worker_t *w, gw_req_t **reqs, int n, int64_t timeout_ns) {
  if (n <= 0 || !reqs_valid(reqs, n)) return UCS_ERR_INVALID_PARAM; /* none can finish */
  multi_arg_t a = {reqs, n, 1, -1};
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = wait_cond(w, cond_multi, &a, timeout_ns);
  worker_leave(w);
  return rc ? rc : a.idx;
}

void gw_req_info(gw_req_t *r, int *status, size_t *length, uint32_t *conn_id, uint32_t *tag,
                 uint32_t *hlen) {
  *status = r->status;
  *length = r->length;
  *conn_id = (uint32_t)(r->sender_tag >> 32);
  *tag = (uint32_t)(r->sender_tag & TAG_USER_MASK);
  *hlen = (uint32_t)((r->sender_tag >> 24) & 0xFF);
}

void gw_req_release(gw_worker_t *w, gw_req_t *r) {
  if (!r) return;
  LOCK(w);
  r->released = 1;
  if (r->ucx_busy) {
    req_unlink(r);
    if (r->is_recv) ucp_request_cancel(w->w, r); /* callback frees it */
  } else {
    if (r->is_recv && r->done && r->status == 0 && w->rtt_half_ns && r->rbuf &&
        now_ns() < r->t_done + w->rtt_half_ns)
      held_keep(w, r); /* arrived, not shown yet: the next receive gets it */
    req_put(w, r);
  }
  UNLOCK(w);
}

int gw_req_state(gw_req_t *r) {
  return (r->done ? 1 : 0) | (r->ucx_busy ? 2 : 0);
}

void gw_req_cancel(gw_worker_t *w, gw_req_t *r) {
  LOCK(w);
  if (r->ucx_busy && r->is_recv && !r->done) {
    req_unlink(r);
    ucp_request_cancel(w->w, r);
  }
  UNLOCK(w);
}

typedef struct {
  gw_req_t *a, *b;
} pair_arg_t;

static int cond_pair(void *arg) {
  pair_arg_t *p = (pair_arg_t *)arg;
  return gw_req_test(p->a) && p->b->done;
}

static int call_impl(gw_conn_t *c, uint32_t tag, const void *sbuf, size_t slen, uint32_t rtag,
                     void *rbuf, size_t rcap, int64_t timeout_ns, size_t *rlen) {
  gw_worker_t *w = c->w;
  LOCK(w);
  int rc = conn_usable(c);
  if (rc) {
    UNLOCK(w);
    return rc;
  }
  gw_req_t *rr = req_get(w), *sr = req_get(w);
  if (!rr || !sr) {
    if (rr) req_put(w, rr);
    if (sr) req_put(w, sr);
    UNLOCK(w);
    return UCS_ERR_NO_MEMORY;
  }
  /* the spin before blocking: the worker's, or (adaptive) twice this worker's recent call
   * waits up to call_spin_max_ns, so a loop whose every call waits longer than spin_ns (a
   * training step of a few ms) does not pay a wake-up per call; as CUDA's default spin-wait */
  int64_t spin = w->spin_ns, smax = __atomic_load_n(&w->call_spin_max_ns, __ATOMIC_RELAXED);
  if (smax > spin) {
    int64_t want = 2 * __atomic_load_n(&w->call_hint_ns, __ATOMIC_RELAXED);
    if (want > spin) spin = want < smax ? want : smax;
  }
  int64_t t0 = now_ns();
  rc = recv_locked(w, c, rtag, TAG_USER_MASK, rbuf, rcap, rr);
  if (rc >= 0 || rc == GW_ERR_TRUNCATED) rc = send_locked(c, tag, NULL, 0, sbuf, slen, sr);
  UNLOCK(w);
  if (rc >= 0) {
    pair_arg_t a = {rr, sr};
    rc = wait_cond_spin(w, cond_pair, &a, timeout_ns, spin);
    if (rc == 0) rc = sr->status ? sr->status : rr->status;
    *rlen = rr->length;
    if (rc == 0) { /* a maximum of the recent waits, decaying by 1/8 a call (races: a hint) */
      int64_t d = now_ns() - t0, h = __atomic_load_n(&w->call_hint_ns, __ATOMIC_RELAXED);
      h -= h >> 3;
      __atomic_store_n(&w->call_hint_ns, d > h ? d : h, __ATOMIC_RELAXED);
    }
  }
  gw_req_release(w, rr);
  gw_req_release(w, sr);
  return rc;
}

int gw_call(gw_conn_t *c, uint32_t tag, const void *sbuf, size_t slen, uint32_t rtag, void *rbuf,
            size_t rcap, int64_t timeout_ns, size_t *rlen) {
  *rlen = 0;
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = call_impl(c, tag, sbuf, slen, rtag, rbuf, rcap, timeout_ns, rlen);
  worker_leave(w);
  return rc;
}

static int echo_serve_impl(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, int64_t n) {
  /* Two halves of buf take turns, so the next receive is posted before the
   * reply goes out and the next request lands in a posted (expected) receive. */
  gw_worker_t *w = c->w;
  (void)tag;
  size_t half = cap / 2;
  char *bufs[2] = {(char *)buf, (char *)buf + half};
  gw_req_t *r;
  int rc = gw_recv(w, c, 0, 0, bufs[0], half, &r);
  if (rc < 0) return rc;
  for (int64_t i = 0; n < 0 || i < n; i++) {
    rc = gw_wait(w, r, -1);
    size_t len = r->length;
    uint32_t t = (uint32_t)(r->sender_tag & TAG_USER_MASK);
    uint32_t hl = (uint32_t)((r->sender_tag >> 24) & 0xFF);
    gw_req_release(w, r);
    if (rc) return rc;
    if (t == 0xFFFFFF) return 0; /* stop message */
    char *cur = bufs[i & 1];
    rc = gw_recv(w, c, 0, 0, bufs[(i + 1) & 1], half, &r);
    if (rc < 0) return rc;
    gw_req_t *s;
    rc = gw_send(c, t, cur, hl, cur + hl, len - hl, &s);
    if (rc < 0) {
      gw_req_release(w, r);
      return rc;
    }
    rc = gw_wait(w, s, -1);
    gw_req_release(w, s);
    if (rc) {
      gw_req_release(w, r);
      return rc;
    }
  }
  gw_req_release(w, r);
  return 0;
}

int gw_echo_serve(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, int64_t n) {
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = echo_serve_impl(c, tag, buf, cap, n);
  worker_leave(w);
  return rc;
}

static int sink_serve_impl(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, int64_t n, int window,
                           int64_t timeout_ns) {
  gw_worker_t *w = c->w;
  if (window < 1) window = 1;
  if (window > 1024) window = 1024;
  if (n < window) window = (int)(n > 0 ? n : 0);
  gw_req_t *ring[1024];
  for (int i = 0; i < window; i++) ring[i] = NULL;
  int rc = 0, posted = 0;
  for (; posted < window; posted++) {
    rc = gw_recv(w, c, tag, TAG_USER_MASK, buf, cap, &ring[posted]);
    if (rc < 0) break;
  }
  int64_t done = 0;
  if (rc >= 0) {
    rc = 0;
    for (; done < n; done++) {
      gw_req_t *r = ring[done % window];
      rc = gw_wait(w, r, timeout_ns);
      gw_req_release(w, r);
      ring[done % window] = NULL;
      if (rc) break;
      if (posted < n) {
        rc = gw_recv(w, c, tag, TAG_USER_MASK, buf, cap, &ring[done % window]);
        if (rc < 0) {
          ring[done % window] = NULL;
          break;
        }
        rc = 0;
        posted++;
      }
    }
  }
  for (int i = 0; i < window; i++) /* on errors: cancel what is still posted */
    if (ring[i]) gw_req_release(w, ring[i]);
  return rc;
}

int gw_sink_serve(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, int64_t n, int window,
                  int64_t timeout_ns) {
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = sink_serve_impl(c, tag, buf, cap, n, window, timeout_ns);
  worker_leave(w);
  return rc;
}

static int serve_impl(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, uint32_t first_tag,
                      const void *first, size_t first_len, uintptr_t handler, void *arg,
                      int64_t timeout_ns, size_t *rlen);

int gw_serve(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, uint32_t first_tag, const void *first,
             size_t first_len, uintptr_t handler, void *arg, int64_t timeout_ns, size_t *rlen) {
  *rlen = 0;
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = serve_impl(c, tag, buf, cap, first_tag, first, first_len, handler, arg, timeout_ns, rlen);
  worker_leave(w);
  return rc;
}

static int serve_impl(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, uint32_t first_tag,
                      const void *first, size_t first_len, uintptr_t handler, void *arg,
                      int64_t timeout_ns, size_t *rlen) {
  gw_worker_t *w = c->w;
  gw_serve_fn fn = (gw_serve_fn)handler;
  gw_msg_t out[GW_SERVE_MAXOUT];
  gw_req_t *reqs[GW_SERVE_MAXOUT + 1];
  /* GW_MSG_DEFER sends: those of the handler call before the last (dprev) and of the last
   * (dcur); dprev is waited for before the next handler call, everything before a return */
  gw_req_t *dprev[GW_SERVE_MAXOUT], *dcur[GW_SERVE_MAXOUT];
  int nprev = 0, ncur = 0;
  int nout = 0;
  if (first) {
    out[0].tag = first_tag;
    out[0].flags = 0;
    out[0].buf = first;
    out[0].len = first_len;
    nout = 1;
  }
  *rlen = 0;
  int rc = 0;
  for (;;) {
    gw_req_t *rr;
    rc = gw_recv(w, c, tag, TAG_USER_MASK, buf, cap, &rr);
    if (rc < 0) break;
    int n = 0;
    reqs[n++] = rr;
    for (int i = 0; i < nout && rc >= 0; i++) {
      gw_req_t *sr;
      rc = gw_send(c, out[i].tag, NULL, 0, out[i].buf, out[i].len, &sr);
      if (rc >= 0) {
        if (out[i].flags & GW_MSG_DEFER)
          dcur[ncur++] = sr;
        else
          reqs[n++] = sr;
      }
    }
    if (rc >= 0) rc = gw_wait_all(w, reqs, n, timeout_ns);
    size_t len = rr->length;
    if (rc == 0) rc = rr->status;
    for (int i = 0; i < n; i++) gw_req_release(w, reqs[i]);
    if (rc) break;
    if (nprev) { /* the handler may now reuse what the call before the last one sent from */
      rc = gw_wait_all(w, dprev, nprev, timeout_ns);
      for (int i = 0; i < nprev; i++) gw_req_release(w, dprev[i]);
      nprev = 0;
      if (rc) break;
    }
    memcpy(dprev, dcur, sizeof(gw_req_t *) * (size_t)ncur);
    nprev = ncur;
    ncur = 0;
    nout = 0;
    int h = fn(arg, buf, len, out, GW_SERVE_MAXOUT, &nout);
    if (nout < 0 || nout > GW_SERVE_MAXOUT) {
      rc = UCS_ERR_INVALID_PARAM;
      break;
    }
    if (h == GW_SERVE_NEXT) continue;
    /* pass (or stop): the handler's messages still go out first, and every deferred send
     * completes before the return */
    n = 0;
    for (int i = 0; i < nout && rc >= 0; i++) {
      gw_req_t *sr;
      rc = gw_send(c, out[i].tag, NULL, 0, out[i].buf, out[i].len, &sr);
      if (rc >= 0) reqs[n++] = sr;
    }
    if (rc >= 0 && n) rc = gw_wait_all(w, reqs, n, timeout_ns);
    for (int i = 0; i < n; i++) gw_req_release(w, reqs[i]);
    if (rc >= 0 && nprev) rc = gw_wait_all(w, dprev, nprev, timeout_ns);
    for (int i = 0; i < nprev; i++) gw_req_release(w, dprev[i]);
    nprev = 0;
    if (rc < 0) return rc;
    if (h < 0) return h;
    *rlen = len;
    return 0;
  }
  /* an error: drop the deferred sends still outstanding */
  for (int i = 0; i < nprev; i++) gw_req_release(w, dprev[i]);
  for (int i = 0; i < ncur; i++) gw_req_release(w, dcur[i]);
  return rc;
}

/* ------------------------------------------------------------ memory + RMA */

struct gw_mem {
  gw_ctx_t *ctx;
  ucp_mem_h mem;
  uint64_t base;
  size_t len;
  int readonly;
};

struct gw_rkey {
  ucp_rkey_h rkey;
  uint64_t base;
  size_t len;
  int readonly;
};

#define GW_RKEY_READONLY 1u

typedef struct {
  uint32_t magic, proto;
  uint64_t base, len;
  uint32_t flags;        /* GW_RKEY_READONLY: the owner registered read-only memory */
  int32_t owner_pid;     /* the owner process (a key is only unpacked on a connection */
  uint64_t owner_pid_ns; /* to it) */
  char owner_boot[40];
  uint32_t ucx_len, sum; /* sum: FNV-1a of the fields above and UCX's packed key */
} gw_rkey_hdr_t;

/* UCX trusts a packed key blindly (a corrupted one can crash it or map garbage),
 * so the key carries a checksum that is verified before UCX sees it */
static uint32_t rkey_sum(const gw_rkey_hdr_t *h, const void *body, size_t n) {
  uint32_t x = 2166136261u;
  const unsigned char *p = (const unsigned char *)h;
  for (size_t i = 0; i < offsetof(gw_rkey_hdr_t, sum); i++) x = (x ^ p[i]) * 16777619u;
  p = (const unsigned char *)body;
  for (size_t i = 0; i < n; i++) x = (x ^ p[i]) * 16777619u;
  return x;
}

int gw_mem_map(gw_ctx_t *ctx, void *addr, size_t len, gw_mem_t **out) {
  if (len == 0) return UCS_ERR_INVALID_PARAM;
  ucp_mem_map_params_t p;
  memset(&p, 0, sizeof(p));
  p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  p.address = addr;
  p.length = len;
  if (!addr) {
    p.field_mask |= UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    p.flags = UCP_MEM_MAP_ALLOCATE;
  }
  gw_mem_t *m = calloc(1, sizeof(*m));
  ucs_status_t st = ucp_mem_map(ctx->ctx, &p, &m->mem);
  if (st != UCS_OK) {
    free(m);
    return st;
  }
  ucp_mem_attr_t a;
  a.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  ucp_mem_query(m->mem, &a);
  m->ctx = ctx;
  m->base = addr ? (uint64_t)(uintptr_t)addr : (uint64_t)(uintptr_t)a.address;
  m->len = len;
  *out = m;
  return 0;
}

void gw_mem_set_readonly(gw_mem_t *m, int readonly) { m->readonly = readonly != 0; }

void gw_mem_unmap(gw_mem_t *m) {
  if (!m) return;
  ucp_mem_unmap(m->ctx->ctx, m->mem);
  free(m);
}

uint64_t gw_mem_base(gw_mem_t *m) { return m->base; }
size_t gw_mem_length(gw_mem_t *m) { return m->len; }

int gw_mem_pack(gw_mem_t *m, void *buf, size_t cap, size_t *len) {
  void *rb;
  size_t rl;
  ucs_status_t st = ucp_rkey_pack(m->ctx->ctx, m->mem, &rb, &rl);
  if (st != UCS_OK) return st;
  *len = sizeof(gw_rkey_hdr_t) + rl;
  if (cap < *len) {
    ucp_rkey_buffer_release(rb);
    return UCS_ERR_BUFFER_TOO_SMALL;
  }
  gw_rkey_hdr_t h;
  memset(&h, 0, sizeof(h));
  h.magic = GW_MAGIC;
  h.proto = GW_PROTO;
  h.base = m->base;
  h.len = m->len;
  h.flags = m->readonly ? GW_RKEY_READONLY : 0;
  gw_hello_t me;
  fill_identity(&me);
  h.owner_pid = me.pid;
  h.owner_pid_ns = me.pid_ns;
  memcpy(h.owner_boot, me.boot_id, sizeof(h.owner_boot));
  h.ucx_len = (uint32_t)rl;
  h.sum = rkey_sum(&h, rb, rl);
  memcpy(buf, &h, sizeof(h));
  memcpy((char *)buf + sizeof(h), rb, rl);
  ucp_rkey_buffer_release(rb);
  return 0;
}

int gw_rkey_unpack(gw_conn_t *c, const void *blob, size_t len, gw_rkey_t **out) {
  gw_rkey_hdr_t h;
  if (len < sizeof(h)) return UCS_ERR_INVALID_PARAM;
  memcpy(&h, blob, sizeof(h));
  if (h.magic != GW_MAGIC || h.proto != GW_PROTO || sizeof(h) + h.ucx_len != len ||
      rkey_sum(&h, (const char *)blob + sizeof(h), h.ucx_len) != h.sum)
    return UCS_ERR_INVALID_PARAM;
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  LOCK(w);
  int rc = conn_usable(c);
  if (rc) {
    UNLOCK(w);
    return rc;
  }
  h.owner_boot[sizeof(h.owner_boot) - 1] = 0;
  if (h.owner_pid != c->peer_pid || h.owner_pid_ns != c->peer_pid_ns ||
      strcmp(h.owner_boot, c->peer_boot) != 0) {
    UNLOCK(w);
    return GW_ERR_FOREIGN_KEY; /* RMA with it would reach another process's memory */
  }
  gw_rkey_t *k = calloc(1, sizeof(*k));
  ucs_status_t st = ucp_ep_rkey_unpack(c->data_ep, (const char *)blob + sizeof(h), &k->rkey);
  UNLOCK(w);
  if (st != UCS_OK) {
    free(k);
    return st;
  }
  k->base = h.base;
  k->len = h.len;
  k->readonly = (h.flags & GW_RKEY_READONLY) != 0;
  *out = k;
  return 0;
}

void gw_rkey_destroy(gw_rkey_t *k) {
  if (!k) return;
  ucp_rkey_destroy(k->rkey);
  free(k);
}

uint64_t gw_rkey_base(gw_rkey_t *k) { return k->base; }
size_t gw_rkey_length(gw_rkey_t *k) { return k->len; }
int gw_rkey_readonly(gw_rkey_t *k) { return k->readonly; }

static int rma(gw_conn_t *c, void *local, size_t len, uint64_t raddr, gw_rkey_t *k,
               gw_req_t **out, int is_put) {
  *out = NULL;
  if (raddr < k->base || len > k->len || raddr - k->base > k->len - len)
    return GW_ERR_OUT_OF_RANGE;
  if (is_put && k->readonly) return GW_ERR_READ_ONLY;
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  LOCK(w);
  int rc = conn_usable(c);
  if (rc) {
    UNLOCK(w);
    return rc;
  }
  gw_req_t *r = req_get(w);
  ucp_request_param_t p;
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_REQUEST;
  p.cb.send = send_cb;
  p.request = r;
  ucs_status_ptr_t sp = is_put ? ucp_put_nbx(c->data_ep, local, len, raddr, k->rkey, &p)
                               : ucp_get_nbx(c->data_ep, local, len, raddr, k->rkey, &p);
  if (UCS_PTR_IS_ERR(sp)) {
    req_put(w, r);
    UNLOCK(w);
    return UCS_PTR_STATUS(sp);
  }
  if (sp == NULL) {
    r->done = 1;
    rc = 0;
  } else {
    r->ucx_busy = 1;
    req_link(&c->pending, r);
    pump_note(w, r, len);
    rc = 1;
  }
  UNLOCK(w);
  *out = r;
  return rc;
}

int gw_put(gw_conn_t *c, const void *local, size_t len, uint64_t raddr, gw_rkey_t *k,
           gw_req_t **out) {
  return rma(c, (void *)local, len, raddr, k, out, 1);
}

int gw_get(gw_conn_t *c, void *local, size_t len, uint64_t raddr, gw_rkey_t *k,
           gw_req_t **out) {
  return rma(c, local, len, raddr, k, out, 0);
}

static int flush_impl(gw_conn_t *c, int64_t timeout_ns);

int gw_flush(gw_conn_t *c, int64_t timeout_ns) {
  RETURN_IF_CLOSED(c);
  gw_worker_t *w = c->w;
  if (worker_enter(w)) return GW_ERR_BAD_STATE;
  int rc = flush_impl(c, timeout_ns);
  worker_leave(w);
  return rc;
}

static int flush_impl(gw_conn_t *c, int64_t timeout_ns) {
  gw_worker_t *w = c->w;
  LOCK(w);
  int rc = conn_usable(c);
  if (rc) {
    UNLOCK(w);
    return rc;
  }
  gw_req_t *r = req_get(w);
  ucp_request_param_t p;
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_REQUEST;
  p.cb.send = send_cb;
  p.request = r;
  ucs_status_ptr_t sp = ucp_ep_flush_nbx(c->data_ep, &p);
  if (UCS_PTR_IS_ERR(sp)) {
    req_put(w, r);
    UNLOCK(w);
    return UCS_PTR_STATUS(sp);
  }
  if (sp == NULL) {
    req_put(w, r);
    UNLOCK(w);
    return 0;
  }
  r->ucx_busy = 1;
  req_link(&c->pending, r);
  UNLOCK(w);
  rc = gw_wait(w, r, timeout_ns);
  gw_req_release(w, r);
  return rc;
}
