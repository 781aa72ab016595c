# session 11 run 2 (carry [".whl"]): does a crossing after a long wait cost more than a hot one on the
# (run 2 ran the probe before the send-call timing and the head* variants were added; run 3 ran the version in the tree)
# GPU host, and does a CUDA wait on the server make the reply's crossing slower than a CPU wait?
# (docs/results/session11_cold_crossing.py: transport round trips, server busy 0/150/700 us in a
# CPU loop, in a loop of worker progress calls, or in a GPU wait; medians outside the server's handler)
source .whl/setup_device.sh || exit 1
for r in 1 2; do
  for tls in tcp,self tcp,sm,self; do
    timeout 120 python3 docs/results/session11_cold_crossing.py $tls 5 gpu 2>&1 | grep -v "^\["
  done
done
