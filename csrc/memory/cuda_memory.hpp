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
// Synchronous copy between any two of host / device memory (unified addressing).
void cuda_copy(void* dst, const void* src, uint64_t len);

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
