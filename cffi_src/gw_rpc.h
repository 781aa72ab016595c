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
/* route of a D2H result carried in its sync frame's reply (protocol.py ROUTE_REPLY) */
#define GW_RPC_ROUTE_REPLY 0xFFFFFFFE
#define GW_RPC_REPLY_INLINE_LIMIT 4096

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
/* ---- launch-run graphs: a run of consecutive cuLaunchKernel records on one stream in one
 * frame (at least min_run of them, kernel parameters known by offset) that the session has run
 * before with the same functions, dimensions and parameter sizes is replayed as a CUDA graph
 * (one kernel node per launch, in a chain): the second time a run is seen its graph is built
 * and instantiated, from then on only the nodes whose parameter bytes changed are updated
 * (cuGraphExecKernelNodeSetParams) before one cuGraphLaunch. A graph whose build, update or
 * launch fails is never used again for that run: its launches go one by one, as without graphs
 * (so a failing launch reports its own error). The entry points are the CUDA 12 ABI's
 * (cuGetProcAddress version 12000): cuGraphCreate, cuGraphAddKernelNode (_v2),
 * cuGraphInstantiateWithFlags, cuGraphLaunch, cuGraphExecKernelNodeSetParams (_v2),
 * cuGraphExecDestroy, cuGraphDestroy. */
typedef struct {
  void *create;
  void *add_kernel;
  void *instantiate;
  void *launch;
  void *set_params;
  void *exec_destroy;
  void *destroy;
} gw_rpc_graph_fns_t;
/* the kernel node parameters of that ABI (CUDA_KERNEL_NODE_PARAMS_v2) */
typedef struct {
  void *func;
  uint32_t gridDimX, gridDimY, gridDimZ;
  uint32_t blockDimX, blockDimY, blockDimZ;
  uint32_t sharedMemBytes;
  void **kernelParams;
  void **extra;
  void *kern;
  void *ctx;
} gw_rpc_knode_t;
#define GW_RPC_GRAPH_MAXRUN 1024
/* graph statistics (gw_rpc_graph_stat) */
#define GW_RPC_GS_RUNS 0      /* runs replayed as a graph */
#define GW_RPC_GS_LAUNCHES 1  /* launches replayed in them */
#define GW_RPC_GS_BUILT 2     /* graphs built and instantiated */
#define GW_RPC_GS_FAILED 3    /* builds, updates or graph launches that failed (the run went one by one) */
#define GW_RPC_GS_UPDATES 4   /* nodes whose parameters were set again */
#define GW_RPC_GS_EVICTED 5   /* cached runs dropped for room */
#define GW_RPC_GS_FLUSHES 6   /* whole-cache drops (a function unbound, the session ending) */
#define GW_RPC_GS_N 7
/* enable (min_run >= 2, cache >= 1 runs) or disable (min_run 0) launch-run graphs; the graphs
 * already made are destroyed. Returns 0, or -1 when an entry point is missing. */
int gw_rpc_graph_setup(gw_rpc_sess_t *s, const gw_rpc_graph_fns_t *fns, uint32_t min_run, uint32_t cache);
/* destroy every cached graph (the context must still exist) */
void gw_rpc_graph_flush(gw_rpc_sess_t *s);
uint64_t gw_rpc_graph_stat(gw_rpc_sess_t *s, int which);
/* the host versions of the graph entry points (CPU executor tests of the cache): a host graph
 * records its nodes and its launch runs them through the host cuLaunchKernel */
void gw_rpc_graph_host_fns(gw_rpc_graph_fns_t *out);
/* host graph calls made (0 create, 1 add, 2 instantiate, 3 launch, 4 set params, 5 exec destroy,
 * 6 destroy), and host graphs alive */
uint64_t gw_rpc_graph_host_count(int which);
/* the next host graph call of that kind (0-4 as above) fails with CUDA_ERROR_UNKNOWN (tests) */
void gw_rpc_graph_host_fail(int which);
int64_t gw_rpc_graph_host_alive(void);

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

/* one frame's timestamps (CLOCK_MONOTONIC ns, the clock of gw_rpc_now_ns and of Python's
 * time.monotonic_ns on Linux); 0 = that point was not reached */
typedef struct {
  uint32_t seq;
  uint32_t ncalls;
  uint32_t flags;    /* GW_RPC_TR_* */
  uint32_t npush;
  int64_t t_in;      /* handler entered: the frame has been received */
  int64_t t_scan;    /* decoded and checked (C runs it) */
  int64_t t_first;   /* the first driver call returned */
  int64_t t_issued;  /* the calls before the first wait (push copy, sync call) returned */
  int64_t t_waited;  /* the last wait returned */
  int64_t t_out;     /* reply and pushes handed to the serve loop */
} gw_rpc_trace_t;
#define GW_RPC_TR_SYNC 1   /* a sync frame */
#define GW_RPC_TR_PASS 2   /* passed to Python (not run in C, or stopped at a failed call) */
int64_t gw_rpc_now_ns(void);

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
  /* per-frame timestamps (rpc_trace_dir; NULL: off): frame i goes to trace[i % trace_cap] */
  gw_rpc_trace_t *trace;
  uint32_t trace_cap;
  uint32_t pad2;
  uint64_t trace_n;            /* frames recorded (total) */
  uint32_t skip_ssync;         /* 1: a stream sync right after a push's wait on the same stream
                                * (nothing issued since) is answered without a driver call */
  uint32_t pad3;
  uint64_t ssync_skipped;      /* stream syncs answered that way (total) */
  /* the reply tail (route GW_RPC_ROUTE_REPLY): per D2H result a u32 length + its bytes, written
   * after the reply head of the frame's reply; rep must hold 64 + tail_cap bytes. tail_n: bytes
   * of the current frame (a frame passed with resume set: what the calls before it wrote) */
  uint8_t *tail;
  uint32_t tail_cap;
  uint32_t tail_n;
  /* bulk lanes (docs/protocol.md "Bulk lanes"): a D2H push of this many bytes or more goes
   * to Python, which sends it on the lanes (0: no lanes) */
  uint64_t lane_min;
  /* frame order (docs/protocol.md "Security"): once seq_on, a frame is run here only when its
   * seq is next_seq (then next_seq advances); any other goes to Python, which refuses it. The
   * cell is shared with Python, which advances it for the frames it runs */
  uint32_t seq_on;
  uint32_t next_seq;
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
/* the waiter's wake-ups so far, by kind: 0 at a batch's due time, 1 after lingering, 2 from
 * its untimed sleep (diagnosis: how often the timer thread runs) */
uint64_t gw_rpc_timer_wakes(gw_rpc_timer_t *t, int kind);
/* blocks until a started batch is still unsent delay_ns after it started: returns its frame
 * seq; -1 once stopped */
int64_t gw_rpc_timer_wait(gw_rpc_timer_t *t);
void gw_rpc_timer_stop(gw_rpc_timer_t *t);

typedef struct gw_rpc_wire gw_rpc_wire_t;

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
  gw_rpc_wire_t *wire; /* gw_rpc_fsync_w: the session's wire state (below) */
} gw_rpc_fsync_t;
int gw_rpc_fsync(gw_rpc_fsync_t *f, uint32_t seq, uint32_t push_done, uint64_t arg);

/* ---- the session's wire state, for the fast sync stub without the Python session lock.
 * One per session. The wire lock (a mutex) is held by whoever uses the session's request /
 * reply path: gw_rpc_fsync_w for its whole round trip, and Python around a flush, a sync
 * round trip or the bye (lock order: Python's session lock, then this one). The frame seq,
 * the pushes done and the call count live here (Python reads them through the cells), and
 * `busy` is set while Python has calls batched or copies in flight: the fast stub then
 * leaves the call to the generated stub (returns 2). `dead` is set once the session closes. */
int gw_rpc_fsync_w(gw_rpc_fsync_t *f, uint64_t arg);
/* 0: the plain answer (the lock is released). 2: busy or dead, nothing sent (released).
 * 1 or negative (a reply Python must read, or the transport's status; the seq was used):
 * the lock is still held, Python reads f->rep and then calls gw_rpc_wire_unlock. */
/* ---- the sync call with calls batched (rpc_c_sync_batch): f's sync record (its frame after
 * the header, len - 16 bytes; the u64 argument patched when len is 32) is appended at
 * frame + pos, the header written (F_SYNC, the wire's seq, ncalls + 1 records), and the round
 * trip made through f's call entry into f->rep, all under the wire lock (the caller holds the
 * Python session lock: lock order kept). The seq is used and the call count grows by
 * ncalls + 1 once the call was made. The plain answer is checked as gw_rpc_fsync_w does, after
 * `ntail` reply-tail results (u32 length + bytes each, walked within the reply's length; the
 * caller copies and checks them). Returns 0 for the plain answer (busy set to busy_after, the
 * lock released), 1 (a reply Python must read) or a negative transport status (the lock is
 * still held: Python reads f->rep, then gw_rpc_wire_unlock / _release), 2 when the session is
 * dead and 3 when the record does not fit `cap` or f is unusable (nothing sent, released). */
int gw_rpc_bsync_w(gw_rpc_fsync_t *f, uint8_t *frame, uint32_t pos, uint32_t cap, uint32_t ncalls,
                   uint64_t arg, uint32_t ntail, int busy_after);
gw_rpc_wire_t *gw_rpc_wire_new(void);
void gw_rpc_wire_free(gw_rpc_wire_t *w);
uint32_t *gw_rpc_wire_seqp(gw_rpc_wire_t *w);        /* the seq of the next frame */
void gw_rpc_wire_use_seq_cell(gw_rpc_wire_t *w, uint32_t *cell); /* keep the seq there (the value moves) */
uint32_t *gw_rpc_wire_push_donep(gw_rpc_wire_t *w);  /* pushes the client has waited for */
uint64_t *gw_rpc_wire_call_seqp(gw_rpc_wire_t *w);   /* calls sent so far */
/* lock, unlock, release: for Python (the holder's thread is recorded; unlock and release do
 * nothing in a thread that does not hold it, so they may sit in a finally / except clause
 * that an exception raised around the lock call reaches either way) */
void gw_rpc_wire_lock(gw_rpc_wire_t *w);
void gw_rpc_wire_unlock(gw_rpc_wire_t *w);
void gw_rpc_wire_release(gw_rpc_wire_t *w, int busy); /* set busy, then unlock */
/* a batch starts (its first deferred call): busy is set and the flush timer (when given)
 * armed with the seq the batch's frame will have, under the lock. Returns 1 when fast sync
 * calls went out since the previous batch started (Python restarts its batch ramp). */
int gw_rpc_wire_open(gw_rpc_wire_t *w, gw_rpc_timer_t *t);
void gw_rpc_wire_kill(gw_rpc_wire_t *w);             /* the session closed: no more fast calls
                                                      * (no lock taken: callable with it held) */

/* ---- the client's batch flush in C (sessions with a wire state): the frame header is
 * written with the wire's next seq, the frame sent through the transport's gw_send (entry
 * points from Endpoint.c_bulk_entry), and the ring moves on to the next frame buffer once
 * that buffer's previous send completed. The wire lock is held throughout. */
#define GW_RPC_FLUSH_FRAMES 8
typedef struct {
  void *send;    /* gw_send */
  void *wait;    /* gw_wait */
  void *release; /* gw_req_release */
  void *conn;
  void *worker;
  int64_t timeout_ns;
  uint32_t req_tag;
  uint32_t nframes;
  uint8_t *frame[8];             /* GW_RPC_FLUSH_FRAMES */
  void *req[8]; /* the send in flight from each frame buffer, or NULL */
} gw_rpc_flusher_t;
/* Send frame `cur` (`len` bytes: header + `ncalls` deferred records) as the next seq; the
 * call count grows by ncalls. Returns the index of the frame to build next (free again), or
 * a negative transport status: nothing sent (seq unchanged) when the send failed, sent when
 * the wait for the next buffer failed (`*sent` tells which). busy is set to `busy_after`
 * when the frame went out. */
int gw_rpc_flush(gw_rpc_flusher_t *fl, gw_rpc_wire_t *w, uint32_t cur, uint32_t len, uint32_t ncalls,
                 int busy_after, int *sent);
/* Wait (up to timeout_ns each) for the flusher's sends in flight and release them. */
void gw_rpc_flusher_drain(gw_rpc_flusher_t *fl, int64_t timeout_ns);
/* Wait for (then release) the send in flight from frame buffer `i`, if any: 0 or a status. */
int gw_rpc_flusher_wait(gw_rpc_flusher_t *fl, uint32_t i, int64_t timeout_ns);

/* ---- bulk copies in the C server (gw_rpc_bulk_*). A handler for the transport's serve loop
 * that wraps gw_rpc_serve_handler: frames made only of async H2D copies with a bulk payload
 * (cuMemcpyHtoDAsync), or only of async D2H copies with at least one of dtoh_min bytes or
 * more (cuMemcpyDtoHAsync, no sync call), it runs itself; every other frame goes to
 * gw_rpc_serve_handler (which runs it or passes it to Python) after the H2D copies still
 * pending are settled, so nothing of a later call runs before them.
 *
 * H2D: each payload message (chunk) is received into a slot of a ring of pinned staging
 * buffers; the receives are posted as the frame is handled and *not waited for*: a slot is
 * settled (receive completed, cuMemcpyHtoDAsync + cuEventRecord on the copy's stream) as soon
 * as its payload is in and every older one is settled (checked at each handler call and while
 * the handler waits), and at the latest when the ring comes round to it, before any other kind
 * of frame runs, or before a frame goes to Python. So up to nslots payloads are in flight while
 * the server handles frames, and each device copy starts as its bytes arrive.
 * D2H: each chunk is copied into a slot (cuMemcpyDtoHAsync + event), copies run ahead of the
 * sends, and each chunk is sent to the client's route tag from its slot once its event is
 * complete; every send is issued before the handler returns.
 * Failures found after the record ran (a short payload, a driver error while settling) are
 * kept as late failures (gw_rpc_late_t): while any is kept every frame is passed to Python,
 * which takes them (gw_rpc_bulk_late) and records each as the deferred error of its copy.
 * A failed D2H copy still sends (empty) messages for its chunks, so the client's receives
 * complete. */
#define GW_RPC_BULK_MAXSLOTS 64
#define GW_RPC_BULK_MAXLATE 8

typedef struct {
  int32_t res;        /* CUresult */
  uint32_t seq;       /* frame seq */
  uint32_t pos;       /* batch position (record index in its frame) */
  uint16_t id;        /* call id */
  uint16_t pad;
  uint64_t back;      /* calls run in C from this one (inclusive) to the pass: its call seq is the
                       * session's call seq (with the C count folded in) minus back */
  uint8_t fixed[24];  /* the record's fixed part ('<QQQ') */
  char msg[232];
} gw_rpc_late_t;

typedef struct {
  gw_rpc_srv_t *srv;  /* the C server it wraps (gw_rpc_serve_handler's arg) */
  /* the transport's entry points and objects (Endpoint.c_bulk_entry) */
  void *recv;         /* int gw_recv(worker, conn, tag, tag_mask, buf, cap, gw_req_t **) */
  void *send;         /* int gw_send(conn, tag, hdr, hlen, buf, len, gw_req_t **) */
  void *wait;         /* int gw_wait(worker, req, timeout_ns) */
  void *test;         /* int gw_req_test(req): 1 once complete */
  void *info;         /* void gw_req_info(req, int *status, size_t *len, uint32_t *, uint32_t *, uint32_t *) */
  void *release;      /* void gw_req_release(worker, req) */
  void *progress;     /* int gw_worker_progress(worker) */
  void *worker;
  void *conn;
  int64_t timeout_ns; /* rpc_bulk_timeout_s */
  /* driver entry points (or the host ones of gw_rpc_bulk_host_fn) */
  void *htod;         /* CUresult cuMemcpyHtoDAsync(CUdeviceptr, const void *, size_t, CUstream) */
  void *dtoh;         /* CUresult cuMemcpyDtoHAsync(void *, CUdeviceptr, size_t, CUstream) */
  void *evrec;        /* CUresult cuEventRecord(CUevent, CUstream) */
  void *evquery;      /* CUresult cuEventQuery(CUevent) */
  uint16_t id_htod;
  uint16_t id_dtoh;
  uint32_t nslots;    /* 2 .. GW_RPC_BULK_MAXSLOTS */
  uint64_t slot_size; /* bytes of each slot; a copy's messages must fit */
  uint64_t chunk;     /* message size of payloads (the session's bulk_chunk; 0: one message) */
  uint64_t inflight;  /* H2D payload bytes posted and not yet settled, at most (at least one
                       * message is always posted): the ring's depth for large messages */
  uint64_t dtoh_min;  /* a D2H-only frame runs here when one of its copies has this many bytes
                       * (0: never; such frames stay with gw_rpc_serve_handler / Python) */
  uint64_t htod_max;  /* an H2D copy larger than this is left to Python (the frame too) */
  uint8_t *slot[GW_RPC_BULK_MAXSLOTS];
  void *ev[GW_RPC_BULK_MAXSLOTS];
} gw_rpc_bulk_cfg_t;

typedef struct gw_rpc_bulk gw_rpc_bulk_t;
gw_rpc_bulk_t *gw_rpc_bulk_new(const gw_rpc_bulk_cfg_t *cfg); /* NULL: bad configuration */
/* bulk lanes: payloads of lane_min bytes or more travel as messages on n extra connections
 * (conns[i] of workers[i], same entry points as the cfg's): chunk j of the payload tagged T on
 * lane (T + j) % n.  Set between handler calls (from the thread that runs them); n 0: none.
 * -1: bad arguments. */
#define GW_RPC_MAXLANES 8
int gw_rpc_bulk_set_lanes(gw_rpc_bulk_t *b, int n, void **conns, void **workers, uint64_t lane_min);
/* the session ends: settle/cancel what is pending, wait for the sends, free */
void gw_rpc_bulk_free(gw_rpc_bulk_t *b);
int gw_rpc_bulk_handler(void *arg, void *msg, size_t len, gw_rpc_msg_t *out, int maxout, int *nout);
uintptr_t gw_rpc_bulk_handler_addr(void);
/* takes up to cap late failures (oldest first); returns how many; *dropped: failures beyond
 * GW_RPC_BULK_MAXLATE that were only counted since the last call */
int gw_rpc_bulk_late(gw_rpc_bulk_t *b, gw_rpc_late_t *out, int cap, uint32_t *dropped);
int gw_rpc_bulk_nlate(gw_rpc_bulk_t *b);
/* counters (totals) */
#define GW_RPC_BS_H2D 0       /* H2D copies run by the bulk handler */
#define GW_RPC_BS_D2H 1       /* D2H copies run by the bulk handler */
#define GW_RPC_BS_FRAMES 2    /* frames it ran itself */
#define GW_RPC_BS_EARLY 3     /* slots settled before the ring came round (a frame needed them) */
#define GW_RPC_BS_PENDING 4   /* H2D payload chunks posted and not yet settled (now) */
#define GW_RPC_BS_MAXPEND 5   /* the most there were at once */
/* Phase times, only while the server traces (rpc_trace_dir: srv->trace set; else they stay 0
 * and the handler pays one branch per phase). CLOCK_MONOTONIC ns, session totals. */
#define GW_RPC_BS_HANDLER_NS 6 /* ns in the handler (not counting gw_rpc_serve_handler's frames) */
#define GW_RPC_BS_HANDLER_N 7  /* handler calls (every frame the serve loop hands it) */
/* Phase p's numbers are at GW_RPC_BS_PH0 + 3 * p + 0: ns in the phase itself (exclusive: time in
 * a phase entered inside it counts only for the inner one, so the exclusive times of all phases
 * add up to GW_RPC_BS_HANDLER_NS), + 1: times entered, + 2: ns from entry to exit (inclusive). */
#define GW_RPC_BS_PH0 8
#define GW_RPC_BPH_OTHER 0      /* the handler outside the phases below (classify, scan, hot calls, bookkeeping) */
/* PRESCAN: before the frame's scan, the entry poll and the settling of pending payloads
 * (the slots an H2D frame takes, or all of them) */
#define GW_RPC_BPH_PRESCAN 1
#define GW_RPC_BPH_RECV_POST 2  /* posting an H2D payload chunk's receive (the transport's recv call) */
#define GW_RPC_BPH_RECV_WAIT 3  /* settling a chunk: waiting for its receive (drives the transport) */
#define GW_RPC_BPH_HTOD 4       /* the cuMemcpyHtoDAsync call (slot -> device) */
#define GW_RPC_BPH_DTOH 5       /* the cuMemcpyDtoHAsync call (device -> slot) */
#define GW_RPC_BPH_EVREC_H2D 6  /* cuEventRecord after an H2D chunk's copy */
#define GW_RPC_BPH_EVREC_D2H 7  /* cuEventRecord after a D2H chunk's copy */
#define GW_RPC_BPH_EVWAIT_H2D 8 /* waiting for a slot's event (query, progress, poll loop) in an H2D frame */
#define GW_RPC_BPH_EVWAIT_D2H 9 /* the same in a D2H frame (slot reuse, and a chunk's copy before its send) */
#define GW_RPC_BPH_SEND_POST 10 /* posting a D2H chunk's send */
#define GW_RPC_BPH_SEND_WAIT 11 /* waiting for a slot's earlier send before reusing it */
#define GW_RPC_BPH_INFLIGHT 12  /* settling older chunks to stay under rpc_c_bulk_inflight posted bytes */
#define GW_RPC_BPH_N 13
#define GW_RPC_BS_N 47          /* GW_RPC_BS_PH0 + 3 * GW_RPC_BPH_N: which = 0 .. GW_RPC_BS_N - 1 */
uint64_t gw_rpc_bulk_stat(gw_rpc_bulk_t *b, int which);
/* host versions of the entry points (the CPU executor): 0 htod (memcpy), 1 dtoh (memcpy),
 * 2 event record (no-op), 3 event query (complete) */
void *gw_rpc_bulk_host_fn(int which);

/* ---- host "driver": memsets and copies on host memory (the CPU executor's device
 * memory), and a counting no-op launch for tests of the dispatch loop */
void *gw_rpc_host_fn(int which);
uint64_t gw_rpc_host_count(int which);
/* the last host launch: 0 = form (1 kernelParams, 2 parameter buffer); 1, 2 = its first two
 * parameters when it got kernelParams (a u64 and a u32; tests) */
uint64_t gw_rpc_host_last(int i);
/* the host cuLaunchKernel's log of its last 4096 launches: how many so far, and launch i's
 * function (0), u64 parameter 0 (1) and u32 parameter 1 (2) */
uint64_t gw_rpc_host_log_n(void);
uint64_t gw_rpc_host_log(uint64_t i, int field);

#endif
