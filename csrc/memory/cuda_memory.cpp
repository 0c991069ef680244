#include "memory/cuda_memory.hpp"

#include "common/error.hpp"

#ifdef LAMINA_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lamina {

#ifdef LAMINA_HAVE_CUDA

namespace {
void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state for the next call
    throw_system(std::string("CUDA not available: ") + what + ": " + cudaGetErrorString(rc));
  }
}
}  // namespace

bool cuda_built() { return true; }

int cuda_check_device_range(const void* ptr, uint64_t len) {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count == 0) throw_system("CUDA not available: no CUDA device");
  cudaPointerAttributes attrs{};
  check(cudaPointerGetAttributes(&attrs, ptr), "cudaPointerGetAttributes");
  if (attrs.type != cudaMemoryTypeDevice && attrs.type != cudaMemoryTypeManaged) {
    throw_usage("pointer is not CUDA device memory");
  }
  if (len > 0) {
    cudaPointerAttributes last{};
    check(cudaPointerGetAttributes(&last, static_cast<const char*>(ptr) + len - 1), "cudaPointerGetAttributes");
    if (last.device != attrs.device || last.type != attrs.type) {
      throw_usage("the range is not one CUDA allocation");
    }
  }
  return attrs.device;
}

void cuda_copy(void* dst, const void* src, uint64_t len) {
  if (len == 0) return;
  check(cudaMemcpy(dst, src, len, cudaMemcpyDefault), "cudaMemcpy");
}

#else

bool cuda_built() { return false; }

int cuda_check_device_range(const void*, uint64_t) {
  throw_usage("CUDA memory needs lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON and the CUDA toolkit)");
}

void cuda_copy(void*, const void*, uint64_t) {
  throw_usage("CUDA memory needs lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON and the CUDA toolkit)");
}

#endif

}  // namespace lamina
