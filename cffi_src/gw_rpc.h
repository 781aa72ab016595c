/* gpuwire RPC hot paths in C (module gpuwire._rpc, cffi API mode, out of line).
 *
 * - gw_rpc_put: the client's batch encoder (record header + fixed part).
 * - gw_rpc_scan: the server's frame decoder: checks a frame's structure and returns
 *   where each record's fields and blobs are (nothing of a malformed frame runs).
 * - gw_rpc_exec: the server's dispatch loop for the hot deferred calls (launches,
 *   async memsets and device copies, event record, stream wait): handle
 *   translation, device-range validation against the session's allocations, and the
 *   driver call through function pointers, all in C. Other calls go back to Python.
 *
 * The layouts here are the spec's wire formats; gpuwire/rpc/executors/_cfast.py
 * checks them against the spec at load and disables the C path on any mismatch.
 */
#ifndef GW_RPC_H
#define GW_RPC_H
#include <stddef.h>
#include <stdint.h>

#define GW_RPC_ABI 3
#define GW_RPC_MAXVAR 4

/* frame statuses (protocol.py ST_*) */
#define GW_RPC_ST_TRUNCATED 3
#define GW_RPC_ST_MALFORMED 4
#define GW_RPC_ST_UNKNOWN_CALL 5

/* bulk tag ranges (protocol.py TAG_BULK_*) */
#define GW_RPC_TAG_IN_FIRST 0x100000
#define GW_RPC_TAG_IN_LAST 0x7FFFFF
#define GW_RPC_TAG_OUT_FIRST 0x800000
#define GW_RPC_TAG_OUT_LAST 0xEFFFFF

/* CUresult values used by the dispatch loop */
#define GW_CU_SUCCESS 0
#define GW_CU_INVALID_VALUE 1
#define GW_CU_INVALID_HANDLE 400

/* handle kinds of the translation tables */
#define GW_RPC_STREAM 0
#define GW_RPC_EVENT 1
#define GW_RPC_FUNCTION 2

/* hot calls (index into gw_rpc_set_call) */
#define GW_RPC_LAUNCH 0
#define GW_RPC_MEMSET8 1
#define GW_RPC_MEMSET16 2
#define GW_RPC_MEMSET32 3
#define GW_RPC_DTOD 4
#define GW_RPC_EVREC 5
#define GW_RPC_WAITEV 6
#define GW_RPC_NHOT 7
/* calls only the C server (gw_rpc_serve_handler) runs: it answers and pushes */
#define GW_RPC_DTOH_ASYNC 7
#define GW_RPC_STREAM_SYNC 8
#define GW_RPC_CTX_SYNC 9
#define GW_RPC_NCALLS 10

typedef struct {
  uint16_t fixed;   /* size of the fixed part */
  uint8_t nvar;     /* request blobs */
  uint8_t nroute;   /* out hostbuf routes */
  uint8_t deferred; /* 1: deferred, 0: sync */
  uint8_t valid;    /* the call id exists */
} gw_rpc_desc_t;

typedef struct {
  uint16_t id;
  uint16_t nvar;
  uint16_t nroute;
  uint16_t pad;
  uint32_t fixed;                   /* offset of the fixed part in the frame */
  uint32_t end;                     /* offset after the record */
  uint32_t var_off[GW_RPC_MAXVAR];  /* inline blob offset, or 0xFFFFFFFF for a bulk blob */
  uint32_t var_len[GW_RPC_MAXVAR];  /* inline blob length, or the bulk tag */
  uint64_t var_bulk[GW_RPC_MAXVAR]; /* bulk byte count */
  uint32_t route[GW_RPC_MAXVAR];
} gw_rpc_rec_t;

typedef struct gw_rpc_sess gw_rpc_sess_t;

uint32_t gw_rpc_abi(void);

/* ---- client encoder: header + fixed part at buf+pos. codes: one struct code per value
 * (b B h H i I q Q). Returns the offset after the fixed part, -1 if it does not fit cap,
 * -2 if a value is out of its code's range, -3 for an unknown code or too many values. */
int64_t gw_rpc_put(uint8_t *buf, size_t cap, size_t pos, uint16_t id, uint32_t len, const char *codes,
                   int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t a4, int64_t a5, int64_t a6,
                   int64_t a7, int64_t a8, int64_t a9);

/* ---- server decoder: records of the body [off, end). desc is indexed by call id.
 * Returns 0, or a frame status with a message in err. */
int gw_rpc_scan(const uint8_t *frame, size_t off, size_t end, uint32_t ncalls, int sync,
                const gw_rpc_desc_t *desc, uint32_t ndesc, gw_rpc_rec_t *out, char *err, size_t errlen);

/* ---- server dispatch session */
gw_rpc_sess_t *gw_rpc_sess_new(void);
void gw_rpc_sess_free(gw_rpc_sess_t *s);
/* hot call `which`: its wire call id and the driver entry point (NULL: Python runs it) */
void gw_rpc_set_call(gw_rpc_sess_t *s, int which, uint16_t call_id, void *fn);
/* id -> driver handle (aux: a function's parameter buffer size) */
int gw_rpc_bind(gw_rpc_sess_t *s, int kind, uint64_t id, uint64_t handle, uint32_t aux);
int gw_rpc_unbind(gw_rpc_sess_t *s, int kind, uint64_t id);
/* a function's parameter offsets (cuFuncGetParamInfo): launches of it then pass kernelParams
 * (pointers into the frame's parameter buffer), which the driver takes faster than the
 * CU_LAUNCH_PARAM_BUFFER_POINTER form; without them the buffer form is used */
int gw_rpc_bind_params(gw_rpc_sess_t *s, uint64_t id, const uint32_t *offs, uint32_t n);
int gw_rpc_alloc_add(gw_rpc_sess_t *s, uint64_t start, uint64_t size);
int gw_rpc_alloc_del(gw_rpc_sess_t *s, uint64_t start);
/* 1 if [ptr, ptr+n) lies inside one allocation */
int gw_rpc_range_ok(gw_rpc_sess_t *s, uint64_t ptr, uint64_t n);
/* run records [from, n) while they are hot calls with a driver entry point. Returns how
 * many ran successfully; if the record after them failed, *res is its CUresult and err
 * says why (that record counts as handled); *res is 0 when it stopped at a call it does
 * not run. */
uint32_t gw_rpc_exec(gw_rpc_sess_t *s, const uint8_t *frame, const gw_rpc_rec_t *recs, uint32_t from,
                     uint32_t n, int *res, char *err, size_t errlen);
/* one launch through the driver entry point fn (CUresult cuLaunchKernel(...)) with a packed
 * parameter buffer */
int gw_rpc_launch(void *fn, uint64_t f, uint32_t gx, uint32_t gy, uint32_t gz, uint32_t bx, uint32_t by,
                  uint32_t bz, uint32_t shmem, uint64_t stream, const void *params, size_t n);

/* ---- the C server: a handler for the transport's gw_serve loop (gw_serve_fn). It answers a
 * frame entirely in C when every record is a call it runs (the hot calls above, small
 * cuMemcpyDtoHAsync pushes) and the sync call, if any, is gwSync, cuStreamSynchronize or
 * cuCtxSynchronize; otherwise it passes the frame to Python untouched. If a call fails,
 * it stops there and passes the frame with resume_at/resume_res/err set: the calls before
 * it ran (their pushes are sent), Python takes it from that record. Python keeps `enabled`
 * off while the session has state the C path does not carry (before the hello, a pending
 * deferred error, a sticky context). Layout of gw_rpc_msg_t = the transport's gw_msg_t. */
typedef struct {
  uint32_t tag;
  uint32_t flags;
  const void *buf;
  size_t len;
} gw_rpc_msg_t;

typedef struct {
  gw_rpc_sess_t *s;            /* dispatch session (hot calls, tables, allocation map) */
  const gw_rpc_desc_t *desc;   /* the scanner's call table */
  uint32_t ndesc;
  uint32_t nrecs;              /* capacity of recs */
  gw_rpc_rec_t *recs;
  uint8_t *rep;                /* reply buffer (>= 64 B) */
  uint8_t *scratch;            /* host memory for pushed D2H bytes */
  uint64_t scratch_cap;
  uint64_t chunk;              /* the session's bulk_chunk (0: one message per push) */
  uint32_t rep_tag;
  int32_t enabled;
  uint32_t pushes;             /* deferred out-buffers pushed, mod 2^32 (shared with Python) */
  uint32_t resume;             /* 1: the passed frame stopped at a failed call */
  uint32_t resume_at;
  int32_t resume_res;
  uint64_t ran;                /* calls run in C since Python last took the count */
  uint64_t frames;             /* frames answered in C (total) */
  uint64_t passed;             /* frames passed to Python (total) */
  uint16_t ids[GW_RPC_NCALLS]; /* wire ids of DTOH_ASYNC, STREAM_SYNC, CTX_SYNC (others unused) */
  uint16_t id_gwsync;
  uint16_t pad;
  void *fn[GW_RPC_NCALLS];     /* driver entry points of DTOH_ASYNC (cuMemcpyDtoHAsync), STREAM_SYNC, CTX_SYNC */
  char err[512];
  /* pushes go out as GW_RPC_MSG_DEFER messages from alternating halves of scratch (one per
   * handler call), so a push is on the wire while the next frame's copy runs; while it waits
   * for a copy the handler drives the transport (progress(worker), the transport's
   * gw_worker_progress) polling fn_query (cuStreamQuery). NULL: cuStreamSynchronize. */
  void *progress;
  void *worker;
  void *fn_query;
  uint32_t flip;
  uint32_t defer;              /* 1: use GW_RPC_MSG_DEFER and the halves (the serve loop has it) */
} gw_rpc_srv_t;
/* = the transport's GW_MSG_DEFER */
#define GW_RPC_MSG_DEFER 1

int gw_rpc_serve_handler(void *arg, void *msg, size_t len, gw_rpc_msg_t *out, int maxout, int *nout);
uintptr_t gw_rpc_serve_handler_addr(void);

/* ---- the client's flush timer: a batch that is still unsent `delay_ns` after it started
 * is flushed. The waiting runs here (the caller's thread blocks in gw_rpc_timer_wait without
 * the GIL) and only returns when a flush is due, so a busy session whose batches go out on
 * their own (ramp, limits, sync calls) never wakes a Python thread. The client stores the
 * seq of the frame it is building at *gw_rpc_timer_seqp() whenever it sends one. */
typedef struct gw_rpc_timer gw_rpc_timer_t;
gw_rpc_timer_t *gw_rpc_timer_new(int64_t delay_ns);
void gw_rpc_timer_free(gw_rpc_timer_t *t);
uint32_t *gw_rpc_timer_seqp(gw_rpc_timer_t *t);
/* a batch started in frame seq */
void gw_rpc_timer_arm(gw_rpc_timer_t *t, uint32_t seq);
/* how many arms had to wake the waiter (it sleeps untimed only after one idle delay) */
uint64_t gw_rpc_timer_signals(gw_rpc_timer_t *t);
/* blocks until a started batch is still unsent delay_ns after it started: returns its frame
 * seq; -1 once stopped */
int64_t gw_rpc_timer_wait(gw_rpc_timer_t *t);
void gw_rpc_timer_stop(gw_rpc_timer_t *t);

/* ---- the client's fast sync stub: a sync call with no or one u64 argument (gwSync,
 * cuCtxSynchronize, cuStreamSynchronize) sent when nothing is batched. The frame (header +
 * one record, `len` bytes) is encoded once by Python; gw_rpc_fsync patches the frame seq (and
 * the u64 argument at offset 24 when len is 32), makes the round trip through the transport's
 * request/reply entry point (`call`: int gw_call(conn, tag, sbuf, slen, rtag, rbuf, rcap,
 * timeout_ns, size_t *rlen), passed as an address so this module does not link the transport)
 * and checks the reply. Returns 0 for the plain answer (reply to `seq`, frame status 0, pushes
 * == push_done, CUresult 0, no deferred-error report), 1 when a reply arrived that Python must
 * read (rlen set: an error, a report, pushes to wait for, a stray error reply), or the
 * transport's negative status. */
typedef struct {
  void *call;
  void *conn;
  uint8_t *rep;
  size_t rep_cap;
  int64_t timeout_ns;
  uint32_t req_tag;
  uint32_t rep_tag;
  size_t rlen;
  uint32_t len;
  uint8_t frame[32];
  uint32_t *seqp; /* when set: seq + 1 is stored here once the frame went out (the flush timer's
                   * seq cell, gw_rpc_timer_seqp), so Python need not */
} gw_rpc_fsync_t;
int gw_rpc_fsync(gw_rpc_fsync_t *f, uint32_t seq, uint32_t push_done, uint64_t arg);

/* ---- host "driver": memsets and copies on host memory (the CPU executor's device
 * memory), and a counting no-op launch for tests of the dispatch loop */
void *gw_rpc_host_fn(int which);
uint64_t gw_rpc_host_count(int which);
/* the last host launch: 0 = form (1 kernelParams, 2 parameter buffer); 1, 2 = its first two
 * parameters when it got kernelParams (a u64 and a u32; tests) */
uint64_t gw_rpc_host_last(int i);

#endif
