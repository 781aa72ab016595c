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

#define GW_RPC_ABI 1
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

/* ---- host "driver": memsets and copies on host memory (the CPU executor's device
 * memory), and a counting no-op launch for tests of the dispatch loop */
void *gw_rpc_host_fn(int which);
uint64_t gw_rpc_host_count(int which);

#endif
