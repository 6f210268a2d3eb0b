/* The busybox+glibc image's probe: dlopen libcuda.so.1 (found on LD_LIBRARY_PATH in
   /.singularity.d/libs), cuInit, cuDeviceGetCount, cuMemAlloc, a copy there and back. */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

typedef int (*fn)();

int main(void) {
    void *cu = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cu) { printf("FAIL dlopen: %s\n", dlerror()); return 1; }
    const char *names[] = {"cuInit", "cuDeviceGetCount", "cuDeviceGet", "cuCtxCreate_v2",
                           "cuMemAlloc_v2", "cuMemcpyHtoD_v2", "cuMemcpyDtoH_v2", "cuMemFree_v2"};
    fn f[8];
    for (int i = 0; i < 8; i++)
        if (!(f[i] = (fn)dlsym(cu, names[i]))) { printf("FAIL dlsym %s\n", names[i]); return 1; }
    int n = 0, dev = 0, rc;
    void *ctx = 0;
    unsigned long long ptr = 0;
    char out[64], in[64] = "hpcrun device check";
    if ((rc = f[0](0)) || (rc = f[1](&n)) || n < 1 || (rc = f[2](&dev, 0)) || (rc = f[3](&ctx, 0, dev))
        || (rc = f[4](&ptr, sizeof in)) || (rc = f[5](ptr, in, sizeof in)) || (rc = f[6](out, ptr, sizeof in))
        || (rc = f[7](ptr))) {
        printf("FAIL CUresult %d (devices %d)\n", rc, n);
        return 1;
    }
    if (memcmp(in, out, sizeof in)) { printf("FAIL copy differs\n"); return 1; }
    printf("OK devices=%d memcpy\n", n);
    return 0;
}
