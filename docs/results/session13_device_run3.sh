# session 13 run 3 (carry [".whl"]): the warm-up before a reply (rpc_warm_us) with its counters:
# --trace pairs (off / 20 us) for the boundary split and the server's warm-ups, then untraced A/B
# (off / 20 us) three times; smallest MLP shape over tcp, 1000 steps, --pin auto
# NEEDS the experimental build: `git apply docs/results/session13_warm_experiment.diff` first (the
# warm-up was measured, found no gain and removed again; docs/benchmarks.md "Session 13")
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-shapes 1024,256,256,16 --tls tcp --pin auto"
for W in 0 20 0 20; do
  GPUWIRE_RPC_WARM_US=$W timeout 120 $B --mlp-rounds 1 --trace --json $OUT/trace_w${W}_$RANDOM.json > /dev/null 2>&1
done
python3 - $OUT/trace_*.json <<'PY'
import json, sys
K = ("boundary", "reply_to_client", "client_issue", "srv_first_call", "srv_gpu_wait", "server_warms")
for f in sys.argv[1:]:
    d = json.load(open(f))
    for r in d["rows"]:
        if r.get("test") != "mlp":
            continue
        sp = r.get("boundary_split_us") or {}
        print(f.split("/")[-1], "ratio %.3f" % r["ratio"], "client_warms", r.get("client_warms"),
              " ".join(f"{k}={sp[k]:.1f}" for k in K if isinstance(sp.get(k), (int, float))))
PY
for k in 1 2 3; do
  for W in 0 20; do
    echo -n "warm=$W "
    GPUWIRE_RPC_WARM_US=$W timeout 120 $B --mlp-rounds 3 --json $OUT/ab_w${W}_$k.json 2> $OUT/ab_${W}_$k.err >/dev/null
    python3 -c "import json,sys; r=[r for r in json.load(open(sys.argv[1]))['rows'] if r.get('test')=='mlp'][0]; print('ratio', r['ratio'], r['round_ratios'], 'client_warms', r.get('client_warms'))" $OUT/ab_w${W}_$k.json
  done
done
