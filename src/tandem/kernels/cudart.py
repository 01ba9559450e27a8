"""The CUDA runtime's cudaMemcpyAsync, called directly: ~3 us of host time per copy against
~20 us through torch's copy_ (dispatch, pinned-memory checks), for the GPU share's ~3 copies
per expert; cudaHostGetDevicePointer, which torch does not bind; and the addresses of
cudaEventQuery, cudaMemcpyAsync, cudaEventRecord and cudaSetDevice for C threads. Found in
the libcudart torch loaded; absent (None) where torch links it statically or has no CUDA."""

from __future__ import annotations

import ctypes
import functools

CUDA_MEMCPY_HOST_TO_DEVICE = 1


class Runtime:
    def __init__(self, path: str):
        self._lib = ctypes.CDLL(path)
        self._memcpy = self._lib.cudaMemcpyAsync
        self._memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                 ctypes.c_void_p]
        self._memcpy.restype = ctypes.c_int
        self._clear_error = self._lib.cudaGetLastError
        self._device_pointer = self._lib.cudaHostGetDevicePointer
        self._device_pointer.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_uint]
        self._device_pointer.restype = ctypes.c_int
        self.path = path
        # addresses for C threads (csrc/runner.c): cudaEventQuery (0 once the event's work is
        # done, 600, cudaErrorNotReady, before), and what queues a GPU share's copies
        address = functools.partial(_address, self._lib)
        self.event_query = address("cudaEventQuery")
        self.memcpy_async, self.event_record, self.set_device = (
            address("cudaMemcpyAsync"), address("cudaEventRecord"), address("cudaSetDevice"))

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue nbytes from host address src (page-locked) to device address dst on `stream`
        (a cudaStream_t, e.g. torch's Stream.cuda_stream)."""
        rc = self._memcpy(dst, src, nbytes, CUDA_MEMCPY_HOST_TO_DEVICE, stream)
        if rc:
            self._clear_error()  # else torch's next launch check would report it as its own
            raise RuntimeError(f"cudaMemcpyAsync of {nbytes} bytes failed: CUDA error {rc}")

    def device_pointer(self, host: int) -> int:
        """The device's address for host address `host` in memory registered as mapped (with
        unified addressing, the same number)."""
        pointer = ctypes.c_void_p()
        rc = self._device_pointer(ctypes.byref(pointer), host, 0)
        if rc:
            self._clear_error()
            raise RuntimeError(f"cudaHostGetDevicePointer of {host:#x} failed: CUDA error {rc}")
        return pointer.value or 0


def _address(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


@functools.cache
def runtime() -> Runtime | None:
    """The runtime library mapped into this process (after torch initialized CUDA), or None."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libcudart.so" in line), None)
        return Runtime(path) if path else None
    except OSError:
        return None
