// lamina-net: stream-ordered device-channel operations (the host API's
// `stream=` forms).
//
// Each call enqueues work on a CUDA stream and returns at once: the host
// thread neither waits for the GPU nor for the network, and nothing is
// allocated or synchronised, so the calls can be captured in a CUDA graph and
// replayed any number of times.
//
// - put / put_signal / signal: a one-thread kernel posts one descriptor to a
//   GPU device channel's ring (lamina_net/device.cuh), after every earlier
//   operation of the stream; the proxy thread executes it on the channel.
//   put and put_signal then wait (in the kernel, bounded) until the proxy has
//   executed the descriptor, so work enqueued after them may overwrite the
//   source (the host API's "returns when the source may be reused", in stream
//   order). They do not wait for the data to be applied at the target.
// - wait: the stream waits until a local 64-bit word is >= value, without the
//   host. kKernel (the default): a one-thread kernel polls the word; bounded
//   by `timeout_ns`, and with a channel it also stops when that channel's
//   error word is set. kMemOp: cuStreamWaitValue64 (the driver's stream
//   memory operation, found with cudaGetDriverEntryPointByVersion): no SM is
//   used, but CUDA gives it no bound - only the word releases the stream -
//   and its comparison is cyclic ((int64)(word - value) >= 0). kAuto: kMemOp
//   where the device supports it, else kKernel.
//
// Errors. Arguments are checked on the host before anything is enqueued
// (kUsage). What fails later, on the GPU, is recorded in this object's status
// words (mapped pinned host memory; status()/error()): a post refused because
// the channel's error word is set, a producer that timed out, a wait that
// passed its bound. A timed-out wait with a channel also sets that channel's
// error word (kErrorStreamWait): everything after it on the channel then stops
// with kDeviceChannelError instead of running on data that never arrived.
// Nothing a kernel does here spins forever.
//
// Threads and lifetimes: every method is thread-safe. The StreamOps object,
// and the DeviceProxy whose handle an operation used, must outlive every
// enqueued operation (and every graph that holds one): synchronise the
// stream, or destroy the graph, before closing them.
//
// Streams: a raw cudaStream_t as an integer; 0 is the legacy default stream
// (1 and 2 are CUDA's cudaStreamLegacy / cudaStreamPerThread handles). The
// kernels run on the current CUDA device, which must own the stream.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "lamina_net/device.cuh"

namespace lamina {

enum StreamOpKind : uint64_t {
  kStreamOpNone = 0,
  kStreamOpPut = 1,
  kStreamOpPutSignal = 2,
  kStreamOpSignal = 3,
  kStreamOpWait = 4,
};

// Written by the kernels (first failure wins), read by the host.
struct StreamStatusWords {
  alignas(64) uint64_t failures;  // failed stream operations so far
  uint64_t claimed;               // 0 until a failure claimed the fields below
  uint64_t first_status;          // a DeviceStatus; published last (release)
  uint64_t first_op;              // a StreamOpKind
  uint64_t first_window;          // dst window (put), signal window, or local window (wait)
  uint64_t first_offset;
  uint64_t first_value;           // nbytes (put), add (signal), awaited value (wait)
  uint64_t first_observed;        // wait: the word's value when it gave up
};

enum class StreamWaitMethod { kAuto = 0, kKernel = 1, kMemOp = 2 };

// The `window` label of a wait on a region's word (Region.wait), not on a
// device channel's local window.
constexpr uint32_t kStreamWaitNoWindow = 0xffffffffu;

struct StreamStatus {
  uint64_t failures = 0;
  int32_t status = kDeviceOk;
  uint64_t op = kStreamOpNone;
  uint64_t window = 0, offset = 0, value = 0, observed = 0;
};

// True when lamina-net was built with the CUDA kernels (CMake found nvcc).
bool stream_ops_built();
// Whether cuStreamWaitValue64 is usable on the current device; *why says why not.
bool stream_mem_ops_supported(std::string* why);

class StreamOps {
 public:
  // Throws kUsage when built without the CUDA kernels, kSystem when CUDA is
  // not available (no driver, no device).
  StreamOps();
  ~StreamOps();
  StreamOps(const StreamOps&) = delete;
  StreamOps& operator=(const StreamOps&) = delete;

  // `h` must be a GPU ring's handle (DeviceProxy with options.gpu). The
  // window and range checks are the header's (kUsage here instead of
  // kDeviceInvalidArgument there).
  void put(const DeviceChannel& h, uintptr_t stream, uint32_t dst_window, uint64_t dst_offset, uint32_t src_window,
           uint64_t src_offset, uint64_t bytes);
  void put_signal(const DeviceChannel& h, uintptr_t stream, uint32_t dst_window, uint64_t dst_offset,
                  uint32_t src_window, uint64_t src_offset, uint64_t bytes, uint32_t signal_window,
                  uint64_t signal_offset, uint64_t add);
  void signal(const DeviceChannel& h, uintptr_t stream, uint32_t signal_window, uint64_t signal_offset,
              uint64_t add);

  // Waits in stream order until the u64 at `word` (host or device address,
  // 8-byte aligned) is >= value. `cuda_memory`: the word is CUDA memory (else
  // host memory, which must be pinned: cudaHostAlloc / cudaHostRegister,
  // torch pin_memory, cupyx.empty_pinned; kUsage otherwise - a kernel
  // reading pageable memory would fault). `control`: the channel's ring
  // control words (nullable). `window` and `offset` only label a failure.
  void wait(const void* word, bool cuda_memory, uint64_t value, uint64_t timeout_ns, DeviceRingControl* control,
            uintptr_t stream, StreamWaitMethod method, uint32_t window, uint64_t offset);

  StreamStatus status() const;
  // "" while no stream operation failed; else what failed first, and how many.
  std::string error() const;
  // The method kAuto picks on the current device.
  StreamWaitMethod auto_method();

 private:
  // The address kernels use for host or device memory; cached per base.
  uint64_t gpu_address(const void* word, bool cuda_memory);

  StreamStatusWords* host_ = nullptr;    // host view of the status words
  StreamStatusWords* device_ = nullptr;  // the kernels' view
  std::mutex mutex_;
  std::vector<std::pair<uintptr_t, uint64_t>> addresses_;  // (host address, GPU address) of words seen
  int mem_ops_ = -1;                                        // -1 unknown, 0 no, 1 yes
};

}  // namespace lamina
