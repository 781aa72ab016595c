# session 13 run 4 (carry [".whl"]): the loopback tcp floor on the GPU host: a raw C ping-pong
# (docs/results/session13_tcp_pingpong.c; busy-polling recv, then with epoll_wait before each recv as
# UCX's tcp transport polls), gpuwire's 8 B round trip against ucx_perftest's under UCX tcp settings
# that could shorten a crossing, and the smallest MLP shape over tcp with two of them against the defaults
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
gcc -O2 -o /tmp/tcp_pingpong docs/results/session13_tcp_pingpong.c || exit 1
for k in 1 2 3; do taskset -c 1,3 /tmp/tcp_pingpong 200000; taskset -c 1,3 /tmp/tcp_pingpong 200000 epoll; done
for v in "" UCX_PROTO_ENABLE=n UCX_TCP_MAX_POLL=1 UCX_ADAPTIVE_PROGRESS=n UCX_TCP_RX_SEG_SIZE=8K ""; do
  env $v timeout 100 python3 -m gpuwire.cli bench transport --tls tcp --sizes 8 --tests lat --iters 50000 --repeat 3 \
    --json $OUT/tr.json > /dev/null 2>&1
  python3 -c "
import json,sys
d=json.load(open(sys.argv[1])); rows=d['rows'] if isinstance(d,dict) else d
print('${v:-defaults}'.ljust(26), '  '.join('%s rtt p50 %.2f mean %.2f' % (r['backend'], r['rtt_us']['p50'], r['rtt_us']['mean']) for r in rows if 'rtt_us' in r))
" $OUT/tr.json
done
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --mlp-shapes 1024,256,256,16 --tls tcp --pin auto"
for k in 1 2; do
  for v in "" UCX_PROTO_ENABLE=n UCX_TCP_MAX_POLL=1; do
    echo -n "${v:-defaults} "
    env $v timeout 120 $B 2> /dev/null | grep -E "^test=mlp" | grep -oE " ratio=[0-9.]+|round_ratios=\[[^]]*\]" | paste -sd' '
  done
done
