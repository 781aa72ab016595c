/* gpuwire UCX engine: the C hot paths under gpuwire.transport.
 *
 * Everything here is called from Python through cffi (API mode, out of line).
 * cffi releases the GIL around every call, so the waits below spin and block
 * without holding it.  Status codes are UCX's ucs_status_t values (0 = OK,
 * 1 = in progress, negative = error); gw_status_string() names them.
 */
#ifndef GW_UCX_H
#define GW_UCX_H
#include <stddef.h>
#include <stdint.h>

typedef struct gw_ctx gw_ctx_t;
typedef struct gw_worker gw_worker_t;
typedef struct gw_conn gw_conn_t;
typedef struct gw_listener gw_listener_t;
typedef struct gw_connreq gw_connreq_t;
typedef struct gw_mem gw_mem_t;
typedef struct gw_rkey gw_rkey_t;
typedef struct gw_req gw_req_t;

/* Our status codes beyond UCX's (UCX uses -1..-80 and -100..-110). */
#define GW_ERR_CONN_LOST   (-1001)  /* peer died, closed, or connection reset */
#define GW_ERR_OUT_OF_RANGE (-1002) /* RMA outside the remote registered region */
#define GW_ERR_BAD_STATE   (-1003)  /* operation on a closed connection */
#define GW_ERR_PROTOCOL    (-1004)  /* handshake: not a gpuwire peer or bad version */
#define GW_ERR_TRUNCATED   (-1005)  /* message longer than the receive buffer */
#define GW_ERR_PEER_EXITED (-1006)  /* the peer process exited (seen through its pidfd) */
#define GW_ERR_READ_ONLY   (-1007)  /* put into a region its owner registered read-only */
#define GW_ERR_FOREIGN_KEY (-1008)  /* packed key of another process than the conn's peer */

/* conn states */
#define GW_CONN_CONNECTING 0
#define GW_CONN_UP         1
#define GW_CONN_LOST       2
#define GW_CONN_CLOSED     3

/* versions */
uint32_t gw_built_api_version(void);           /* (major << 16) | minor of the headers */
void gw_runtime_version(unsigned *major, unsigned *minor, unsigned *release);
const char *gw_status_string(int status);
int gw_lib_path(char *buf, size_t len);          /* file the running libucp came from */

/* context: UCX config passthrough (keys without the UCX_ prefix) */
int gw_ctx_create(const char **keys, const char **vals, int n, gw_ctx_t **out,
                  char *err, size_t errlen);
void gw_ctx_destroy(gw_ctx_t *ctx);
int gw_ctx_info(gw_ctx_t *ctx, char *buf, size_t len);   /* ucp_context_print_info text */
int gw_ctx_config(gw_ctx_t *ctx, char *buf, size_t len); /* ucp_config_print text */

/* worker + progress engine */
int gw_worker_create(gw_ctx_t *ctx, gw_worker_t **out);
void gw_worker_destroy(gw_worker_t *w);
void gw_worker_set_spin(gw_worker_t *w, int64_t spin_ns);
void gw_worker_set_call_spin_max(gw_worker_t *w, int64_t ns);
int64_t gw_worker_call_hint(gw_worker_t *w);
uint64_t gw_worker_blocked_total(gw_worker_t *w);
void gw_worker_set_rtt_emulation(gw_worker_t *w, int64_t rtt_ns);
int gw_worker_address(gw_worker_t *w, void *buf, size_t cap, size_t *len);
int gw_worker_progress(gw_worker_t *w);
/* spin then block on the event fd until something happens or timeout; 1 if work */
int gw_worker_wait_event(gw_worker_t *w, int64_t timeout_ns);
int gw_worker_efd(gw_worker_t *w);
/* progress thread: while sends/receives of >= min_bytes are in flight a thread of the
 * worker's own drives it (their bytes move while the caller runs other code); it sleeps
 * when none are.  start is idempotent (updates min_bytes); stop joins it (destroy stops it) */
int gw_worker_pump_start(gw_worker_t *w, size_t min_bytes);
void gw_worker_pump_stop(gw_worker_t *w);
void gw_worker_pump_stats(gw_worker_t *w, int *running, int *in_flight, uint64_t *passes,
                          uint64_t *blocks, uint64_t *reqs);
/* conns the worker saw go down since the last call: their ids */
int gw_worker_poll_lost(gw_worker_t *w, uint32_t *ids, int cap);

/* listener (sockaddr; needs tcp in UCX_TLS) */
int gw_listen(gw_worker_t *w, const char *ip, int port, gw_listener_t **out);
/* handoff 1: connection requests are queued for gw_listener_take, and each is accepted
 * (gw_connreq_accept) on a worker of the caller's choice (of the same context) or rejected;
 * handoff 0: gw_listen's listener (the handshake runs on the listener's worker, gw_accept) */
int gw_listen_mode(gw_worker_t *w, const char *ip, int port, int handoff, gw_listener_t **out);
int gw_listener_port(gw_listener_t *l);
/* requests still queued are rejected; one taken and not yet accepted or rejected keeps
 * UCX's listener (not the port's new requests) until it is */
void gw_listener_close(gw_listener_t *l);
/* wait for one connection to finish its handshake; GW: 0 and *out, or UCS_ERR_TIMED_OUT
 * (UCS_ERR_INVALID_PARAM on a handoff listener) */
int gw_accept(gw_listener_t *l, int64_t timeout_ns, gw_conn_t **out);
/* handoff listener: the next connection request (0 and *out, UCS_ERR_TIMED_OUT,
 * GW_ERR_BAD_STATE once closed, UCS_ERR_INVALID_PARAM on a listener not in handoff mode) */
int gw_listener_take(gw_listener_t *l, int64_t timeout_ns, gw_connreq_t **out);
/* accept a taken request on worker w (any worker of the listener's context): the control
 * endpoint and the connection live on w, the handshake runs there (waited for up to
 * timeout_ns: the WELCOME, carrying w's data address, has left). Errors: GW_ERR_BAD_STATE
 * (already accepted/rejected, w closing, or the listener's worker destroyed), the
 * handshake's failure or UCS_ERR_TIMED_OUT (the half-made connection is closed) */
int gw_connreq_accept(gw_connreq_t *r, gw_worker_t *w, int64_t timeout_ns, gw_conn_t **out);
/* reject it (the client's connect fails); nothing if already accepted or rejected */
void gw_connreq_reject(gw_connreq_t *r);
/* free it (rejected first if neither happened) */
void gw_connreq_free(gw_connreq_t *r);
/* the client's address "ip:port" as the listener saw it ("" if UCX did not say) */
int gw_connreq_client(gw_connreq_t *r, char *buf, size_t len);
/* connections accepted by address (connect_address from a peer) arrive here */
int gw_accept_any(gw_worker_t *w, int64_t timeout_ns, gw_conn_t **out);

/* connect: sockaddr (host:port), or a peer worker's address */
int gw_connect(gw_worker_t *w, const char *ip, int port, int64_t timeout_ns, gw_conn_t **out);
int gw_connect_address(gw_worker_t *w, const void *addr, size_t len, int64_t timeout_ns,
                       gw_conn_t **out);
int gw_conn_close(gw_conn_t *c, int64_t timeout_ns);     /* idempotent */
/* force: no flush, the peer is not waited for (operations still in flight are dropped):
 * the control endpoint is closed forced, a data endpoint in error mode PEER too, one in
 * mode NONE (which UCX cannot force) is left to the worker's destruction */
int gw_conn_close_mode(gw_conn_t *c, int64_t timeout_ns, int force);
void gw_conn_free(gw_conn_t *c);                         /* after close */
int gw_conn_state(gw_conn_t *c);
int gw_conn_lost_status(gw_conn_t *c);
uint32_t gw_conn_id(gw_conn_t *c);
uint32_t gw_conn_remote_id(gw_conn_t *c);               /* the peer's id of this connection */
/* TESTS ONLY: make later sends (and the BYE of the close) carry `id` as the receiver's
 * connection id, i.e. impersonate another connection of the peer's worker */
void gw_conn_debug_set_remote_id(gw_conn_t *c, uint32_t id);
int gw_conn_peer(gw_conn_t *c, char *buf, size_t len);   /* "host pid N" */
int gw_conn_transports(gw_conn_t *c, char *buf, size_t len); /* data path "tcp/lo,..." */
int gw_conn_peer_pid(gw_conn_t *c);

/* messages: tag = 24-bit user tag; hdr (<=255 B) + payload go as one message */
int gw_send(gw_conn_t *c, uint32_t tag, const void *hdr, size_t hlen,
            const void *buf, size_t len, gw_req_t **out);
/* conn NULL: from any connection of the worker */
int gw_recv(gw_worker_t *w, gw_conn_t *c, uint32_t tag, uint32_t tag_mask,
            void *buf, size_t cap, gw_req_t **out);
int gw_req_test(gw_req_t *r);                            /* 1 done, 0 not */
int gw_wait(gw_worker_t *w, gw_req_t *r, int64_t timeout_ns);
int gw_wait_all(gw_worker_t *w, gw_req_t **reqs, int n, int64_t timeout_ns);
/* wait until any of reqs is done: returns index or a negative status */
int gw_wait_any(gw_worker_t *w, gw_req_t **reqs, int n, int64_t timeout_ns);
void gw_req_info(gw_req_t *r, int *status, size_t *length, uint32_t *conn_id,
                 uint32_t *tag, uint32_t *hlen);
void gw_req_release(gw_worker_t *w, gw_req_t *r);        /* cancels if still pending */
/* 1: done; 2: UCX still owns it (may still read or write its buffers) */
int gw_req_state(gw_req_t *r);
/* cancel a pending receive, keeping the request (release it once gw_req_state has no 2) */
void gw_req_cancel(gw_worker_t *w, gw_req_t *r);
/* send then wait for the reply tagged rtag, all in C: the request/reply hot path */
int gw_call(gw_conn_t *c, uint32_t tag, const void *sbuf, size_t slen, uint32_t rtag,
            void *rbuf, size_t rcap, int64_t timeout_ns, size_t *rlen);
/* serve echo in C until the conn goes down or n messages (bench server) */
int gw_echo_serve(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, int64_t n);
/* receive n messages tagged `tag` (exact) into buf from C, keeping `window` receives
 * posted (a sink, e.g. the bandwidth bench's server); every message must fit in cap */
int gw_sink_serve(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, int64_t n, int window,
                  int64_t timeout_ns);
/* Serve requests from C: a layer above passes a handler (function pointer as an integer).
 * Loop: receive one message tagged `tag` (exact) into buf; handler(arg, buf, len, out, maxout,
 * &nout) fills out[0..nout) with messages to send (in order; they must not point into buf and
 * must stay valid until the next handler call or the return); it returns GW_SERVE_NEXT: send
 * them and receive the next message, GW_SERVE_PASS: send them and return 0 with the message
 * left in buf (*rlen = its length) for the caller, or a negative status to return.  `first`
 * (first_len bytes, tag first_tag; NULL: none) is sent right after the first receive is posted
 * (the caller's reply to the message it handled).  Each receive is posted before the sends, so
 * the peer's next request lands in a posted receive. */
typedef struct {
  uint32_t tag;
  uint32_t flags; /* 0 or GW_MSG_DEFER */
  const void *buf;
  size_t len;
} gw_msg_t;
/* flags GW_MSG_DEFER (handler messages of a GW_SERVE_NEXT return): the send may still be in
 * flight during the next handler call; it completes before the handler call after that one
 * and before gw_serve returns, so a handler alternating two buffers between its calls can
 * prepare the next message while the previous one is on the wire */
#define GW_MSG_DEFER 1
#define GW_SERVE_PASS 0
#define GW_SERVE_NEXT 1
#define GW_SERVE_MAXOUT 32
typedef int (*gw_serve_fn)(void *arg, void *msg, size_t len, gw_msg_t *out, int maxout, int *nout);
int gw_serve(gw_conn_t *c, uint32_t tag, void *buf, size_t cap, uint32_t first_tag, const void *first,
             size_t first_len, uintptr_t handler, void *arg, int64_t timeout_ns, size_t *rlen);

/* memory registration and RMA */
int gw_mem_map(gw_ctx_t *ctx, void *addr, size_t len, gw_mem_t **out);
void gw_mem_unmap(gw_mem_t *m);
/* read-only memory: its packed keys say so, and a peer's put with one is refused */
void gw_mem_set_readonly(gw_mem_t *m, int readonly);
uint64_t gw_mem_base(gw_mem_t *m);
size_t gw_mem_length(gw_mem_t *m);
int gw_mem_pack(gw_mem_t *m, void *buf, size_t cap, size_t *len);
int gw_rkey_unpack(gw_conn_t *c, const void *blob, size_t len, gw_rkey_t **out);
void gw_rkey_destroy(gw_rkey_t *k);
uint64_t gw_rkey_base(gw_rkey_t *k);
size_t gw_rkey_length(gw_rkey_t *k);
int gw_rkey_readonly(gw_rkey_t *k);
int gw_put(gw_conn_t *c, const void *local, size_t len, uint64_t raddr, gw_rkey_t *k,
           gw_req_t **out);
int gw_get(gw_conn_t *c, void *local, size_t len, uint64_t raddr, gw_rkey_t *k,
           gw_req_t **out);
int gw_flush(gw_conn_t *c, int64_t timeout_ns);

#endif
