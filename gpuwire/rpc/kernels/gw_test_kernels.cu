// Test kernels for gpuwire's RPC tests and `gpuwire bench rpc`.
// The CPU executor has Python versions of the same names (gpuwire/rpc/executors/cpu.py),
// so the same PTX runs against both executors. Rebuild the PTX with:
//   nvcc -ptx -arch=compute_80 -o gw_test_kernels.ptx gw_test_kernels.cu
//   nvcc -fatbin --no-compress -gencode arch=compute_80,code=compute_80 \
//        -gencode arch=compute_90,code=sm_90 -o gw_test_kernels.fatbin gw_test_kernels.cu
extern "C" {

__global__ void noop() {}

__global__ void vector_add(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}

__global__ void fill_f32(float* p, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = v;
}

__global__ void saxpy(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}

// writes one byte at p: with a bad p this is an illegal address (sticky error tests)
__global__ void poke(unsigned char* p) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *p = 1;
}

// ---- a small MLP (row-major; one thread per output element)
// y[B,O] = act(x[B,I] @ W[I,O] + b[O])
__global__ void mlp_linear_fwd(const float* x, const float* W, const float* b, float* y,
                               int B, int I, int O, int relu) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * O) return;
    int r = idx / O, c = idx % O;
    float acc = b[c];
    for (int k = 0; k < I; ++k) acc += x[r * I + k] * W[k * O + c];
    y[idx] = (relu && acc < 0.f) ? 0.f : acc;
}

// dy = 2 (y - t) / n; loss[0] += sum((y - t)^2) / n
__global__ void mlp_mse_grad(const float* y, const float* t, float* dy, float* loss, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float d = y[i] - t[i];
    dy[i] = 2.f * d / n;
    atomicAdd(loss, d * d / n);
}

// dy *= (y > 0)
__global__ void mlp_relu_bwd(const float* y, float* dy, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && y[i] <= 0.f) dy[i] = 0.f;
}

// dx[B,I] = dy[B,O] @ W[I,O]^T
__global__ void mlp_linear_bwd_data(const float* dy, const float* W, float* dx, int B, int I, int O) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * I) return;
    int r = idx / I, k = idx % I;
    float acc = 0.f;
    for (int c = 0; c < O; ++c) acc += dy[r * O + c] * W[k * O + c];
    dx[idx] = acc;
}

// dW[I,O] = x[B,I]^T @ dy[B,O]; db[O] = sum_b dy[b, O]   (I*O + O threads)
__global__ void mlp_linear_bwd_weight(const float* x, const float* dy, float* dW, float* db,
                                      int B, int I, int O) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < I * O) {
        int k = idx / O, c = idx % O;
        float acc = 0.f;
        for (int r = 0; r < B; ++r) acc += x[r * I + k] * dy[r * O + c];
        dW[idx] = acc;
    } else if (idx < I * O + O) {
        int c = idx - I * O;
        float acc = 0.f;
        for (int r = 0; r < B; ++r) acc += dy[r * O + c];
        db[c] = acc;
    }
}

__global__ void sgd_update(float* w, const float* g, float lr, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) w[i] -= lr * g[i];
}

}
