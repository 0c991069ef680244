// lamina-net: stream-ordered device-channel operations (see stream_ops.hpp).
// Compiled by nvcc (sm_80, sm_90) when CMake finds the CUDA compiler; the
// stub in stream_ops_unavailable.cpp stands in otherwise.
#include "proxy/stream_ops.hpp"

#include <cuda.h>  // types and enums of cuStreamWaitValue64 only: the driver is reached through the runtime
#include <cuda_runtime.h>

#include <cstring>

#include "common/error.hpp"
#include "memory/cuda_memory.hpp"

namespace lamina {

namespace {

// ---------------------------------------------------------------- kernels
// Every kernel is one thread: it does what a thread of a user's kernel would
// do with the same handle, in stream order.

__device__ void record_failure(StreamStatusWords* st, DeviceStatus s, uint64_t op, uint64_t window, uint64_t offset,
                               uint64_t value, uint64_t observed) {
  auto* claimed = reinterpret_cast<unsigned long long*>(&st->claimed);
  if (atomicCAS_system(claimed, 0ull, 1ull) == 0ull) {
    st->first_op = op;
    st->first_window = window;
    st->first_offset = offset;
    st->first_value = value;
    st->first_observed = observed;
    __threadfence_system();
    device_detail::store_release(&st->first_status, static_cast<uint64_t>(s));
  }
  atomicAdd_system(reinterpret_cast<unsigned long long*>(&st->failures), 1ull);
  __threadfence_system();
}

// put and put_signal hand the source back in stream order: the next work in
// the stream may overwrite it once the proxy has executed the descriptor.
__device__ DeviceStatus until_source_free(const DeviceChannel& h, DeviceStatus s, uint64_t ticket) {
  return s == kDeviceOk ? h.wait_source_free(ticket) : s;
}

__global__ void put_kernel(DeviceChannel h, StreamStatusWords* st, uint32_t dst_window, uint64_t dst_offset,
                           uint32_t src_window, uint64_t src_offset, uint64_t bytes) {
  uint64_t ticket = 0;
  DeviceStatus s = h.put(dst_window, dst_offset, src_window, src_offset, bytes, &ticket);
  s = until_source_free(h, s, ticket);
  if (s != kDeviceOk) record_failure(st, s, kStreamOpPut, dst_window, dst_offset, bytes, 0);
}

__global__ void put_signal_kernel(DeviceChannel h, StreamStatusWords* st, uint32_t dst_window, uint64_t dst_offset,
                                  uint32_t src_window, uint64_t src_offset, uint64_t bytes, uint32_t signal_window,
                                  uint64_t signal_offset, uint64_t add) {
  uint64_t ticket = 0;
  DeviceStatus s =
      h.put_signal(dst_window, dst_offset, src_window, src_offset, bytes, signal_window, signal_offset, add, &ticket);
  s = until_source_free(h, s, ticket);
  if (s != kDeviceOk) record_failure(st, s, kStreamOpPutSignal, dst_window, dst_offset, bytes, 0);
}

__global__ void signal_kernel(DeviceChannel h, StreamStatusWords* st, uint32_t signal_window, uint64_t signal_offset,
                              uint64_t add) {
  const DeviceStatus s = h.signal(signal_window, signal_offset, add);
  if (s != kDeviceOk) record_failure(st, s, kStreamOpSignal, signal_window, signal_offset, add, 0);
}

// Bounded like DeviceChannel::wait_word, and with a channel it also ends when
// the channel's error word is set; a timeout with a channel sets that word.
__global__ void wait_kernel(const uint64_t* word, uint64_t value, uint64_t timeout_ns, DeviceRingControl* control,
                            StreamStatusWords* st, uint32_t window, uint64_t offset) {
  using namespace device_detail;
  for (int i = 0; i < 64; ++i) {
    if (load_acquire(word) >= value) return;
  }
  WaitBound bound(timeout_ns);
  for (;;) {
    if (load_acquire(word) >= value) return;
    if (control != nullptr && (bound.spins & 15) == 0 && load_acquire(&control->error) != kErrorNone) {
      const uint64_t seen = load_acquire(word);
      if (seen >= value) return;  // the signal landed just before the failure
      record_failure(st, kDeviceChannelError, kStreamOpWait, window, offset, value, seen);
      return;
    }
    if (bound.expired()) {
      const uint64_t seen = load_acquire(word);
      if (seen >= value) return;
      record_failure(st, kDeviceTimeout, kStreamOpWait, window, offset, value, seen);
      if (control != nullptr) set_error(control, kErrorStreamWait, 0);
      return;
    }
  }
}

// ---------------------------------------------------------------- host helpers

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) {
    cudaGetLastError();
    std::string why = std::string("CUDA not available: ") + what + ": " + cudaGetErrorString(rc);
    if (rc == cudaErrorInsufficientDriver || rc == cudaErrorNoDevice) why += " (" + cuda_versions() + ")";
    throw_system(why);
  }
}

void check_launch(const char* what) {
  const cudaError_t rc = cudaGetLastError();
  if (rc == cudaSuccess) return;
  if (rc == cudaErrorInvalidResourceHandle || rc == cudaErrorContextIsDestroyed) {
    throw_usage(std::string("stream ") + what + ": the stream is not a live stream of the current CUDA device (" +
                cudaGetErrorString(rc) + ")");
  }
  throw_system(std::string("stream ") + what + ": kernel launch failed: " + cudaGetErrorString(rc));
}

bool range_ok(uint64_t offset, uint64_t len, uint64_t size) { return offset <= size && len <= size - offset; }

void check_handle(const DeviceChannel& h, const char* what) {
  if (h.magic != kDeviceChannelMagic || h.abi_version != kDeviceAbiVersion) {
    throw_usage(std::string("stream ") + what + ": not a device channel handle of this lamina-net");
  }
}

void check_remote(const DeviceChannel& h, const char* what, uint32_t w, uint64_t offset, uint64_t len,
                  uint32_t need, const char* role) {
  if (w >= h.remote_count) {
    throw_usage(std::string("stream ") + what + ": " + role + " window " + std::to_string(w) +
                " is not one of the channel's " + std::to_string(h.remote_count) + " remote windows");
  }
  if ((h.remote_access[w] & need) != need) {
    throw_usage(std::string("stream ") + what + ": remote window " + std::to_string(w) + " was registered without " +
                (need == device_detail::kRemoteAtomic ? "REMOTE_ATOMIC" : "REMOTE_WRITE"));
  }
  if (!range_ok(offset, len, h.remote_size[w])) {
    throw_usage(std::string("stream ") + what + ": range [" + std::to_string(offset) + ", +" + std::to_string(len) +
                ") is outside remote window " + std::to_string(w) + " of " + std::to_string(h.remote_size[w]) +
                " bytes");
  }
  if (need == device_detail::kRemoteAtomic && offset % 8 != 0) {
    throw_usage(std::string("stream ") + what + ": signal offset " + std::to_string(offset) +
                " is not 8-byte aligned");
  }
}

void check_source(const DeviceChannel& h, const char* what, uint32_t w, uint64_t offset, uint64_t len) {
  if (w >= h.local_count) {
    throw_usage(std::string("stream ") + what + ": source window " + std::to_string(w) +
                " is not one of the channel's " + std::to_string(h.local_count) + " local windows");
  }
  if (!range_ok(offset, len, h.local[w].size)) {
    throw_usage(std::string("stream ") + what + ": source range [" + std::to_string(offset) + ", +" +
                std::to_string(len) + ") is outside local window " + std::to_string(w) + " of " +
                std::to_string(h.local[w].size) + " bytes");
  }
}

// cuStreamWaitValue64 and cuDeviceGetAttribute through the runtime's entry
// point lookup: the library links no libcuda.
using WaitValue64Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
using DeviceGetAttributeFn = CUresult (*)(int*, CUdevice_attribute, CUdevice);

template <typename Fn>
Fn driver_entry(const char* name, std::string* why) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t rc = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found);
  if (rc != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
    cudaGetLastError();
    if (why) *why = std::string("the CUDA driver has no ") + name + (rc != cudaSuccess ? std::string(" (") +
                    cudaGetErrorString(rc) + ")" : std::string());
    return nullptr;
  }
  return reinterpret_cast<Fn>(fn);
}

WaitValue64Fn wait_value64() {
  static WaitValue64Fn fn = driver_entry<WaitValue64Fn>("cuStreamWaitValue64", nullptr);
  return fn;
}

}  // namespace

bool stream_ops_built() { return true; }

bool stream_mem_ops_supported(std::string* why) {
  if (wait_value64() == nullptr) {
    if (why) *why = "the CUDA driver has no cuStreamWaitValue64";
    return false;
  }
  static DeviceGetAttributeFn get_attribute = driver_entry<DeviceGetAttributeFn>("cuDeviceGetAttribute", why);
  if (get_attribute == nullptr) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    if (why) *why = "no current CUDA device";
    return false;
  }
  int value = 0;
  if (get_attribute(&value, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, device) != CUDA_SUCCESS ||
      value == 0) {
    if (why) *why = "the device does not support 64-bit stream memory operations";
    return false;
  }
  return true;
}

StreamOps::StreamOps() {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count == 0) throw_system("CUDA not available: no CUDA device");
  void* host = nullptr;
  check(cudaHostAlloc(&host, sizeof(StreamStatusWords), cudaHostAllocMapped | cudaHostAllocPortable),
        "cudaHostAlloc");
  std::memset(host, 0, sizeof(StreamStatusWords));
  void* dev = nullptr;
  const cudaError_t rc = cudaHostGetDevicePointer(&dev, host, 0);
  if (rc != cudaSuccess) {
    cudaFreeHost(host);
    check(rc, "cudaHostGetDevicePointer");
  }
  host_ = static_cast<StreamStatusWords*>(host);
  device_ = static_cast<StreamStatusWords*>(dev);
}

StreamOps::~StreamOps() {
  if (host_) cudaFreeHost(host_);
}

void StreamOps::put(const DeviceChannel& h, uintptr_t stream, uint32_t dst_window, uint64_t dst_offset,
                    uint32_t src_window, uint64_t src_offset, uint64_t bytes) {
  check_handle(h, "put");
  check_remote(h, "put", dst_window, dst_offset, bytes, device_detail::kRemoteWrite, "destination");
  check_source(h, "put", src_window, src_offset, bytes);
  put_kernel<<<1, 1, 0, as_stream(stream)>>>(h, device_, dst_window, dst_offset, src_window, src_offset, bytes);
  check_launch("put");
}

void StreamOps::put_signal(const DeviceChannel& h, uintptr_t stream, uint32_t dst_window, uint64_t dst_offset,
                           uint32_t src_window, uint64_t src_offset, uint64_t bytes, uint32_t signal_window,
                           uint64_t signal_offset, uint64_t add) {
  check_handle(h, "put_signal");
  check_remote(h, "put_signal", dst_window, dst_offset, bytes, device_detail::kRemoteWrite, "destination");
  check_source(h, "put_signal", src_window, src_offset, bytes);
  check_remote(h, "put_signal", signal_window, signal_offset, 8, device_detail::kRemoteAtomic, "signal");
  put_signal_kernel<<<1, 1, 0, as_stream(stream)>>>(h, device_, dst_window, dst_offset, src_window, src_offset, bytes,
                                                    signal_window, signal_offset, add);
  check_launch("put_signal");
}

void StreamOps::signal(const DeviceChannel& h, uintptr_t stream, uint32_t signal_window, uint64_t signal_offset,
                       uint64_t add) {
  check_handle(h, "signal");
  check_remote(h, "signal", signal_window, signal_offset, 8, device_detail::kRemoteAtomic, "signal");
  signal_kernel<<<1, 1, 0, as_stream(stream)>>>(h, device_, signal_window, signal_offset, add);
  check_launch("signal");
}

uint64_t StreamOps::gpu_address(const void* word, bool cuda_memory) {
  const auto key = reinterpret_cast<uintptr_t>(word);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [host, gpu] : addresses_) {
      if (host == key) return gpu;
    }
  }
  cudaPointerAttributes attrs{};
  const cudaError_t rc = cudaPointerGetAttributes(&attrs, word);
  if (rc != cudaSuccess) {
    cudaGetLastError();
    throw_system(std::string("stream wait: cudaPointerGetAttributes: ") + cudaGetErrorString(rc));
  }
  uint64_t gpu = 0;
  if (cuda_memory) {
    if (attrs.type != cudaMemoryTypeDevice && attrs.type != cudaMemoryTypeManaged) {
      throw_usage("stream wait: the signal word is not CUDA device memory");
    }
    gpu = key;
  } else if (attrs.type == cudaMemoryTypeHost && attrs.devicePointer != nullptr) {
    gpu = reinterpret_cast<uint64_t>(attrs.devicePointer);  // pinned and mapped
  } else if (attrs.type == cudaMemoryTypeManaged) {
    gpu = key;
  } else {
    throw_usage(
        "stream wait: the signal word is in pageable host memory, which a GPU cannot read; register a pinned "
        "array as the signal region (torch: .pin_memory(); cupy: cupyx.empty_pinned; or cudaHostAlloc / "
        "cudaHostRegister), or GPU memory");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (addresses_.size() < 256) addresses_.emplace_back(key, gpu);
  return gpu;
}

StreamWaitMethod StreamOps::auto_method() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (mem_ops_ < 0) mem_ops_ = stream_mem_ops_supported(nullptr) ? 1 : 0;
  return mem_ops_ ? StreamWaitMethod::kMemOp : StreamWaitMethod::kKernel;
}

void StreamOps::wait(const void* word, bool cuda_memory, uint64_t value, uint64_t timeout_ns,
                     DeviceRingControl* control, uintptr_t stream, StreamWaitMethod method, uint32_t window,
                     uint64_t offset) {
  if (word == nullptr || reinterpret_cast<uintptr_t>(word) % 8 != 0) {
    throw_usage("stream wait: the signal word is not an 8-byte aligned address");
  }
  const uint64_t address = gpu_address(word, cuda_memory);
  if (method == StreamWaitMethod::kAuto) method = auto_method();
  if (method == StreamWaitMethod::kMemOp) {
    std::string why;
    if (!stream_mem_ops_supported(&why)) throw_usage("stream wait with method 'mem_op': " + why);
    const CUresult rc = wait_value64()(reinterpret_cast<CUstream>(as_stream(stream)), address, value,
                                       CU_STREAM_WAIT_VALUE_GEQ);
    if (rc != CUDA_SUCCESS) {
      throw_system("stream wait: cuStreamWaitValue64 failed with CUresult " + std::to_string(static_cast<int>(rc)));
    }
    return;
  }
  wait_kernel<<<1, 1, 0, as_stream(stream)>>>(reinterpret_cast<const uint64_t*>(address), value, timeout_ns, control,
                                              device_, window, offset);
  check_launch("wait");
}

StreamStatus StreamOps::status() const {
  StreamStatus s;
  s.status = static_cast<int32_t>(__atomic_load_n(&host_->first_status, __ATOMIC_ACQUIRE));
  s.failures = __atomic_load_n(&host_->failures, __ATOMIC_ACQUIRE);
  if (s.status != kDeviceOk) {
    s.op = host_->first_op;
    s.window = host_->first_window;
    s.offset = host_->first_offset;
    s.value = host_->first_value;
    s.observed = host_->first_observed;
    if (s.failures == 0) s.failures = 1;  // the count is bumped just after the fields
  }
  return s;
}

std::string StreamOps::error() const {
  const StreamStatus s = status();
  if (s.status == kDeviceOk) return "";
  const char* what = s.status == kDeviceTimeout        ? "timed out"
                     : s.status == kDeviceChannelError ? "stopped: the channel failed (see its error)"
                     : s.status == kDeviceInvalidArgument ? "was refused: invalid argument"
                                                          : "failed";
  std::string out;
  switch (s.op) {
    case kStreamOpWait:
      out = (s.window == kStreamWaitNoWindow ? std::string("stream wait on a region's word at offset ")
                                             : "stream wait on local window " + std::to_string(s.window) +
                                                   " offset ") +
            std::to_string(s.offset) + " for value >= " + std::to_string(s.value) + " " + what + " (the word was " +
            std::to_string(s.observed) + ")";
      break;
    case kStreamOpSignal:
      out = "stream signal of remote window " + std::to_string(s.window) + " offset " + std::to_string(s.offset) +
            " " + what;
      break;
    default:
      out = std::string(s.op == kStreamOpPut ? "stream put" : "stream put_signal") + " of " +
            std::to_string(s.value) + " bytes to remote window " + std::to_string(s.window) + " offset " +
            std::to_string(s.offset) + " " + what;
  }
  if (s.failures > 1) out += "; " + std::to_string(s.failures) + " stream operations failed in all";
  return out;
}

}  // namespace lamina
