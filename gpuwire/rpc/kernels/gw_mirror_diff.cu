// gpuwire server-side change detection for pinned mirrors (gwMirrorPull, docs/pinned.md).
// Shipped as PTX (gw_mirror_diff.ptx, compute_80), built with:
//   nvcc -ptx -arch=compute_80 -o gw_mirror_diff.ptx gw_mirror_diff.cu
// flags[k] becomes 1 when granule k of a[0, n) differs from b[0, n) (the caller zeroes flags).
// Word compares when both addresses are 16-byte aligned, bytes for the tail / unaligned data.

extern "C" __global__ void gw_mirror_diff(const unsigned char *a, const unsigned char *b,
                                          unsigned long long n, unsigned long long granule,
                                          unsigned int *flags)
{
    unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long nth = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long head = 0;
    if ((((unsigned long long)a | (unsigned long long)b) & 15) == 0 && (granule & 15) == 0) {
        const uint4 *a4 = (const uint4 *)a;
        const uint4 *b4 = (const uint4 *)b;
        unsigned long long nw = n >> 4;
        unsigned long long gw = granule >> 4;
        for (unsigned long long i = tid; i < nw; i += nth) {
            uint4 x = a4[i], y = b4[i];
            if (x.x != y.x || x.y != y.y || x.z != y.z || x.w != y.w) {
                unsigned long long k = i / gw;
                if (!flags[k]) flags[k] = 1;
            }
        }
        head = nw << 4;
    }
    for (unsigned long long i = head + tid; i < n; i += nth) {
        if (a[i] != b[i]) {
            unsigned long long k = i / granule;
            if (!flags[k]) flags[k] = 1;
        }
    }
}
