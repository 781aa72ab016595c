# session 10 run 8 (carry [".whl"]): where the tcp MLP's extra time goes on the mid shape vs the smallest:
# --trace (server frame timestamps joined with the client's) for both shapes over tcp and sm, one host
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --pin auto --trace --mlp-shapes 2048,512,512,32;1024,256,256,16"
for t in tcp sm tcp sm; do
  timeout 120 $B --tls $t --json $OUT/trace_${t}_$RANDOM.json > /dev/null 2>&1
done
python3 - $OUT/trace_*.json <<'PY'
import json, sys
K = ("boundary", "reply_to_client", "client_issue", "srv_first_call", "srv_span", "at_f1_in", "at_f2_in", "at_f3_in",
     "at_sync_call", "at_done", "srv_gpu_wait")
for f in sorted(sys.argv[1:]):
    d = json.load(open(f))
    for r in d["rows"]:
        if r.get("test") != "mlp":
            continue
        sp = r.get("boundary_split_us") or {}
        print(f.split("/")[-1], r["shape"], "ratio %.3f loc %.1f rem %.1f us" % (r["ratio"], r["local_ms_per_step"] * 1e3, r["remote_ms_per_step"] * 1e3),
              "span loc/rem %.1f/%.1f" % (r["local_gpu_span_us"], r["remote_gpu_span_us"]),
              " ".join(f"{k}={sp[k]:.1f}" for k in K if sp.get(k) is not None))
PY
