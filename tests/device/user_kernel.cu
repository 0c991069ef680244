// A user's "kernel" file: includes lamina_net/device.cuh and nothing else of
// lamina-net, and uses every call of the API. test_device.py compiles it
// with g++ -std=c++17 -Wall -Wextra -Werror (as C++, no CUDA headers: the
// functions then run in CPU threads) and with nvcc for sm_80 and sm_90.
#include <lamina_net/device.cuh>

#if defined(__CUDACC__)
#define USER_GLOBAL __global__
#else
#define USER_GLOBAL
#endif

namespace {
static_assert(sizeof(lamina::DeviceDescriptor) == 64, "a ring slot is 64 bytes");
static_assert(alignof(lamina::DeviceDescriptor) == 64, "a ring slot is cache-line aligned");
static_assert(lamina::kMaxDeviceWindows == 16, "window count");
}  // namespace

// One layer's q/k/v out, the attention output back: the shape of the
// Lamina decode step on the device side.
USER_GLOBAL void user_layer_step(lamina::DeviceChannel ch, unsigned long long bytes, unsigned long long step,
                                 int* status_out) {
  int s = 0;
#if defined(__CUDACC__)
  const bool leader = threadIdx.x == 0 && blockIdx.x == 0;
#else
  const bool leader = true;
#endif
  lamina_u64 ticket = 0;
  if (leader) {
    s |= ch.put(0, step * bytes, 0, 0, bytes, &ticket);
    s |= ch.wait_source_free(ticket);
    s |= ch.put_signal(0, step * bytes, 0, 0, bytes, 1, 0, 1, &ticket);
    s |= ch.signal(1, 8, 2);
    s |= ch.flush();
    s |= ch.wait(1, 0, step + 1);
    s |= ch.wait_word(reinterpret_cast<const lamina_u64*>(ch.local[1].base), step + 1);
    s |= ch.status();
    s |= static_cast<int>(ch.error_code() != lamina::kErrorNone);
  }
  // Warp and block forms: every thread of the block calls.
  s |= ch.put_warp(0, 0, 0, 0, bytes);
  s |= ch.put_signal_warp(0, 0, 0, 0, bytes, 1, 0);
  s |= ch.signal_warp(1, 0);
  s |= ch.flush_warp();
  s |= ch.wait_warp(1, 0, 1);
  s |= ch.put_block(0, 0, 0, 0, bytes);
  s |= ch.put_signal_block(0, 0, 0, 0, bytes, 1, 0, 1);
  s |= ch.signal_block(1, 0, 1);
  s |= ch.flush_block();
  s |= ch.wait_block(1, 0, 1);
  lamina::DeviceDescriptor d = {};
  d.opcode = lamina::kDeviceOpNop;
  if (leader) s |= ch.post(d, &ticket);
  if (leader && status_out) *status_out = s;
}

#if !defined(__CUDACC__)
// The handle passes by value like any trivially copyable struct.
lamina::DeviceChannel user_copy(const lamina::DeviceChannel& ch) {
  lamina::DeviceChannel copy = ch;
  return copy;
}
#endif
