#include "memory/cuda_memory.hpp"

#include <cstring>

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
    std::string why = std::string("CUDA not available: ") + what + ": " + cudaGetErrorString(rc);
    // No driver, or one older than the linked runtime: say which, in the same line.
    if (rc == cudaErrorInsufficientDriver || rc == cudaErrorNoDevice) why += " (" + cuda_versions() + ")";
    throw_system(why);
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

namespace {
// lamina-net's own copy streams: non-blocking (no implicit ordering with the
// legacy default stream), one per thread and device, created on first use.
constexpr int kMaxStreamDevices = 64;
struct ThreadCopyStreams {
  cudaStream_t streams[kMaxStreamDevices] = {};
  ~ThreadCopyStreams() {
    for (cudaStream_t s : streams) {
      if (s) cudaStreamDestroy(s);
    }
  }
};

int device_of(const void* ptr) {
  cudaPointerAttributes attrs{};
  if (cudaPointerGetAttributes(&attrs, ptr) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return attrs.type == cudaMemoryTypeDevice || attrs.type == cudaMemoryTypeManaged ? attrs.device : -1;
}

cudaStream_t copy_stream(int device) {
  thread_local ThreadCopyStreams mine;
  if (device < 0 || device >= kMaxStreamDevices) check(cudaGetDevice(&device), "cudaGetDevice");
  if (device < 0 || device >= kMaxStreamDevices) throw_system("CUDA not available: device ordinal out of range");
  cudaStream_t& s = mine.streams[device];
  if (s == nullptr) {
    int current = 0;
    check(cudaGetDevice(&current), "cudaGetDevice");
    if (current != device) check(cudaSetDevice(device), "cudaSetDevice");
    const cudaError_t rc = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (current != device) cudaSetDevice(current);
    if (rc != cudaSuccess) s = nullptr;
    check(rc, "cudaStreamCreateWithFlags");
  }
  return s;
}
}  // namespace

void cuda_copy(void* dst, const void* src, uint64_t len) {
  if (len == 0) return;
  int device = device_of(dst);
  if (device < 0) device = device_of(src);
  cudaStream_t s = copy_stream(device);
  check(cudaMemcpyAsync(dst, src, len, cudaMemcpyDefault, s), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

uint64_t cuda_read_u64(const void* device_ptr) {
  uint64_t v = 0;
  cuda_copy(&v, device_ptr, sizeof(v));
  return v;
}

void cuda_stream_synchronize(uintptr_t stream) {
  const cudaError_t rc = cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream));
  if (rc == cudaErrorInvalidResourceHandle) {
    cudaGetLastError();
    throw_usage("the CUDA stream " + std::to_string(stream) + " is not a live stream");
  }
  check(rc, "cudaStreamSynchronize");
}

void* cuda_alloc_mapped_host(uint64_t size, void** device_ptr) {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count == 0) throw_system("CUDA not available: no CUDA device");
  void* host = nullptr;
  check(cudaHostAlloc(&host, size, cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
  std::memset(host, 0, size);
  void* dev = nullptr;
  cudaError_t rc = cudaHostGetDevicePointer(&dev, host, 0);
  if (rc != cudaSuccess) {
    cudaFreeHost(host);
    check(rc, "cudaHostGetDevicePointer");
  }
  *device_ptr = dev;
  return host;
}

void cuda_free_mapped_host(void* host_ptr) {
  if (host_ptr) cudaFreeHost(host_ptr);
}

void* cuda_alloc_device(uint64_t size) {
  void* p = nullptr;
  check(cudaMalloc(&p, size), "cudaMalloc");
  cudaError_t rc = cudaMemset(p, 0, size);
  if (rc == cudaSuccess) rc = cudaDeviceSynchronize();
  if (rc != cudaSuccess) {
    cudaFree(p);
    check(rc, "cudaMemset");
  }
  return p;
}

void cuda_free_device(void* ptr) {
  if (ptr) cudaFree(ptr);
}

std::string cuda_versions() {
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaError_t rc = cudaDriverGetVersion(&driver);
  auto v = [](int x) { return std::to_string(x / 1000) + "." + std::to_string((x % 1000) / 10); };
  std::string out = "runtime " + v(runtime);
  if (rc != cudaSuccess || driver == 0) return out + ", no CUDA driver";
  out = "driver " + v(driver) + ", " + out;
  if (driver < runtime) {
    out += " (the driver is older than the runtime: GPU calls will fail; update the NVIDIA driver to one for CUDA " +
           v(runtime) + " or newer)";
  }
  return out;
}

#else

bool cuda_built() { return false; }

int cuda_check_device_range(const void*, uint64_t) {
  throw_usage("CUDA memory needs lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON and the CUDA toolkit)");
}

void cuda_copy(void*, const void*, uint64_t) {
  throw_usage("CUDA memory needs lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON and the CUDA toolkit)");
}
uint64_t cuda_read_u64(const void*) {
  throw_usage("CUDA memory needs lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON and the CUDA toolkit)");
}
void cuda_stream_synchronize(uintptr_t) {
  throw_usage("CUDA streams need lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON and the CUDA toolkit)");
}

void* cuda_alloc_mapped_host(uint64_t, void**) {
  throw_usage("GPU device channels need lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON and the CUDA toolkit)");
}
void cuda_free_mapped_host(void*) {}
void* cuda_alloc_device(uint64_t) {
  throw_usage("GPU device channels need lamina-net built with CUDA (LAMINA_NET_WITH_CUDA=ON and the CUDA toolkit)");
}
void cuda_free_device(void*) {}
std::string cuda_versions() { return "built without CUDA"; }

#endif

}  // namespace lamina
