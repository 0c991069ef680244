// lamina-net: the stream-ordered operations of a build without the CUDA
// kernels (no CUDA toolkit or no nvcc, or LAMINA_NET_WITH_CUDA=OFF). Every
// entry point is a typed "built without CUDA" error.
#include "common/error.hpp"
#include "proxy/stream_ops.hpp"

namespace lamina {

namespace {
[[noreturn]] void unavailable() {
  throw_usage(
      "stream-ordered operations need lamina-net built with CUDA: this build has no CUDA kernels "
      "(LAMINA_NET_WITH_CUDA=ON, the CUDA toolkit and nvcc)");
}
}  // namespace

bool stream_ops_built() { return false; }

bool stream_mem_ops_supported(std::string* why) {
  if (why) *why = "built without CUDA";
  return false;
}

StreamOps::StreamOps() { unavailable(); }
StreamOps::~StreamOps() = default;
void StreamOps::put(const DeviceChannel&, uintptr_t, uint32_t, uint64_t, uint32_t, uint64_t, uint64_t) {
  unavailable();
}
void StreamOps::put_signal(const DeviceChannel&, uintptr_t, uint32_t, uint64_t, uint32_t, uint64_t, uint64_t,
                           uint32_t, uint64_t, uint64_t) {
  unavailable();
}
void StreamOps::signal(const DeviceChannel&, uintptr_t, uint32_t, uint64_t, uint64_t) { unavailable(); }
void StreamOps::wait(const void*, bool, uint64_t, uint64_t, DeviceRingControl*, uintptr_t, StreamWaitMethod, uint32_t,
                     uint64_t) {
  unavailable();
}
StreamStatus StreamOps::status() const { return StreamStatus{}; }
std::string StreamOps::error() const { return ""; }
StreamWaitMethod StreamOps::auto_method() { return StreamWaitMethod::kKernel; }
uint64_t StreamOps::gpu_address(const void*, bool) { unavailable(); }

}  // namespace lamina
