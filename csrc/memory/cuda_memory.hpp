// lamina-net: the few CUDA runtime calls the host-side core needs.
//
// Built with LAMINA_HAVE_CUDA (CMake option LAMINA_NET_WITH_CUDA, on when the
// CUDA toolkit is found; cudart is linked statically, so importing lamina_net
// needs no CUDA driver). Without it every call throws kUsage "built without
// CUDA". On a machine without a GPU or driver they throw kSystem
// "CUDA not available: <reason>".
//
// Byte-stream transports (tcp, shm) move GPU memory through host staging:
// a GPU source is copied to host before it is framed; a payload for a GPU
// region is received into host memory and copied up before its signal is
// applied. Signal and atomic words must be host memory.
#pragma once

#include <cstdint>
#include <string>

namespace lamina {

bool cuda_built();
// Checks that [ptr, ptr+len) is device memory; returns its device ordinal.
int cuda_check_device_range(const void* ptr, uint64_t len);
// Copy between any two of host / device memory (unified addressing); returns
// when it is done. It runs on a non-blocking stream of lamina-net's own (one
// per thread and device), never on the legacy default stream: it neither
// waits for nor delays other streams' work (a running producer kernel, a
// kernel waiting on a signal this copy precedes).
void cuda_copy(void* dst, const void* src, uint64_t len);
// The u64 at a CUDA device address, read with cuda_copy (not atomic against a
// kernel writing it at the same time; a value some kernel stored).
uint64_t cuda_read_u64(const void* device_ptr);
// Blocks the calling thread until every operation enqueued on `stream` (a
// raw cudaStream_t; 0 = legacy default) is done. Host-path puts call it so
// that a GPU source is read only after the work that produced it.
void cuda_stream_synchronize(uintptr_t stream);

// Pinned host memory mapped into every GPU's address space (zeroed), for
// words both a kernel and a host thread touch (the device ring). *device_ptr
// gets the address kernels use. Throws kSystem without a GPU.
void* cuda_alloc_mapped_host(uint64_t size, void** device_ptr);
void cuda_free_mapped_host(void* host_ptr);
// Zeroed device memory on the current device.
void* cuda_alloc_device(uint64_t size);
void cuda_free_device(void* ptr);
// "driver D, runtime R" (CUDA versions), or why there is no driver.
std::string cuda_versions();

}  // namespace lamina
