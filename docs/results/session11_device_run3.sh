# session 11 run 3 (carry [".whl"]): run 2's probe with the server's send call timed and the heads-up
# variants (the server sends the client a small message 20 us before its reply): is the reply's slow
# crossing after a wait the server's send path, and does a crossing just before it make it warm?
source .whl/setup_device.sh || exit 1
for r in 1 2; do
  for tls in tcp,self tcp,sm,self sm,self; do
    timeout 120 python3 docs/results/session11_cold_crossing.py $tls 5 2>&1 | grep -v "^\["
  done
done
