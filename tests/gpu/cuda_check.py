"""Inside a container with --nv (or a CDI device): the driver API through ctypes.
cuInit, cuDeviceGetCount, a context, cuMemAlloc, a host->device->host copy, and a
trivial kernel (PTX, JIT-compiled by the driver) launch. Prints one OK line or fails."""

import ctypes
import sys

PTX = b"""
.version 6.0
.target sm_50
.address_size 64
.visible .entry add_one(.param .u64 p) {
    .reg .u64 %a; .reg .u32 %v;
    ld.param.u64 %a, [p];
    cvta.to.global.u64 %a, %a;
    ld.global.u32 %v, [%a];
    add.u32 %v, %v, 1;
    st.global.u32 [%a], %v;
    ret;
}
"""


def main():
    cu = ctypes.CDLL("libcuda.so.1")

    def call(name, *args):
        rc = getattr(cu, name)(*args)
        if rc != 0:
            sys.exit(f"FAIL {name}: CUresult {rc}")

    call("cuInit", 0)
    n, ver = ctypes.c_int(), ctypes.c_int()
    call("cuDeviceGetCount", ctypes.byref(n))
    call("cuDriverGetVersion", ctypes.byref(ver))
    if n.value < 1:
        sys.exit("FAIL no device")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    call("cuDeviceGet", ctypes.byref(dev), 0)
    call("cuCtxCreate_v2", ctypes.byref(ctx), 0, dev)
    ptr = ctypes.c_uint64()
    call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(4096))
    src = (ctypes.c_uint32 * 1024)(*range(1024))
    dst = (ctypes.c_uint32 * 1024)()
    call("cuMemcpyHtoD_v2", ptr, src, ctypes.c_size_t(4096))
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    call("cuModuleLoadData", ctypes.byref(mod), ctypes.c_char_p(PTX))
    call("cuModuleGetFunction", ctypes.byref(fn), mod, b"add_one")
    arg = ctypes.c_uint64(ptr.value)
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(arg), ctypes.c_void_p))
    call("cuLaunchKernel", fn, 1, 1, 1, 1, 1, 1, 0, None, params, None)
    call("cuCtxSynchronize")
    call("cuMemcpyDtoH_v2", dst, ptr, ctypes.c_size_t(4096))
    want = [1] + list(range(1, 1024))
    if list(dst) != want:
        sys.exit(f"FAIL copy/kernel: got {list(dst)[:4]}, want {want[:4]}")
    call("cuMemFree_v2", ptr)
    print(f"OK devices={n.value} cuda={ver.value // 1000}.{ver.value % 1000 // 10} memcpy+kernel")


main()
