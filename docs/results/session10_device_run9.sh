# session 10 run 9 (carry [".whl"]): the mid shape's longer boundary (run 8): is it the client's flush timer
# going to sleep between 0.8 ms steps (its first arm of a step then wakes it)? --trace, tcp and sm, timer on / off
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --pin auto --trace --mlp-shapes 2048,512,512,32;1024,256,256,16"
for t in tcp sm; do for f in default 0 default 0; do
  if [ $f = 0 ]; then X="--flush-us 0"; else X=""; fi
  timeout 120 $B --tls $t $X --json $OUT/t9_${t}_flush${f}_$RANDOM.json > /dev/null 2>&1
done; done
python3 - $OUT/t9_*.json <<'PY'
import json, sys
K = ("boundary", "srv_reply", "reply_to_client", "client_loop", "client_issue", "batch_to_server", "srv_first_call")
for f in sorted(sys.argv[1:]):
    d = json.load(open(f))
    for r in d["rows"]:
        if r.get("test") != "mlp":
            continue
        sp = r.get("boundary_split_us") or {}
        print(f.split("/")[-1], r["shape"], "ratio %.3f" % r["ratio"], " ".join(f"{k}={sp[k]:.1f}" for k in K if sp.get(k) is not None))
PY
