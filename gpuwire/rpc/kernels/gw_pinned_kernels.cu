// Kernels for the pinned-buffer mirroring tests and `gpuwire bench pinned`: each takes
// host (pinned) pointers through its parameters. The CPU executor has Python versions
// of the same names (gpuwire/rpc/kernels/pinned.py), so the same PTX runs on both.
// Rebuild the PTX with:
//   nvcc -ptx -arch=compute_80 -o gw_pinned_kernels.ptx gw_pinned_kernels.cu
extern "C" {

// out[i] = a * in[i] + 1
__global__ void pin_scale(const float* in, float* out, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * in[i] + 1.0f;
}

// out[i] = x[i] + y[i]   (the tests pass three pointers into one region)
__global__ void pin_add(const float* x, const float* y, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] + y[i];
}

// data[i] += v   (read-modify-write: ordering tests across streams and events)
__global__ void pin_inc(int* data, int v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) data[i] += v;
}

// a struct parameter with two pointers inside (offsets 0 and 8), 24 bytes
struct PinDesc {
    const float* in;
    float* out;
    float scale;
    int n;
};

// d.out[i] = d.scale * d.in[i]
__global__ void pin_struct(PinDesc d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < d.n) d.out[i] = d.scale * d.in[i];
}

// a [begin, end) pair: n = end - begin (needs both pointers rewritten alike)
__global__ void pin_span(const float* begin, const float* end, float* out) {
    long n = end - begin;
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2.0f * begin[i];
}

// stores an integer parameter as is: the false-positive test passes an integer equal
// to a pinned address (rewritten unless the kernel opts that slot out)
__global__ void pin_key(unsigned long long key, unsigned long long* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = key;
}

// reads in[0..n) and writes nothing back to it: sum into *out (bench "nothing changed")
__global__ void pin_sum(const float* in, float* out, int n) {
    __shared__ float part[256];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += in[i];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int k = 0; k < blockDim.x; k++) t += part[k];
        out[0] = t;
    }
}

// touch: out[0] = in[0] (a launch whose cost is the launch itself, for the bench)
__global__ void pin_touch(const float* in, float* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = in[0];
}

}
