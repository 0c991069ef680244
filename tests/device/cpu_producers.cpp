// CPU producers for the device API tests: the same lamina_net/device.cuh a
// kernel includes, compiled by g++ alone and driven from CPU threads.
// Loaded by the tests with ctypes; every function takes the handle's bytes.
#include <cstring>
#include <thread>
#include <vector>

#include <lamina_net/device.cuh>

namespace {
lamina::DeviceChannel from_bytes(const void* bytes) {
  lamina::DeviceChannel ch;
  std::memcpy(&ch, bytes, sizeof(ch));
  return ch;
}
}  // namespace

extern "C" {

unsigned long long ln_handle_bytes() { return sizeof(lamina::DeviceChannel); }

int ln_put(const void* h, unsigned dst_w, unsigned long long dst_off, unsigned src_w, unsigned long long src_off,
           unsigned long long bytes) {
  return from_bytes(h).put(dst_w, dst_off, src_w, src_off, bytes);
}

int ln_put_signal(const void* h, unsigned dst_w, unsigned long long dst_off, unsigned src_w,
                  unsigned long long src_off, unsigned long long bytes, unsigned sig_w, unsigned long long sig_off,
                  unsigned long long add) {
  return from_bytes(h).put_signal(dst_w, dst_off, src_w, src_off, bytes, sig_w, sig_off, add);
}

int ln_signal(const void* h, unsigned sig_w, unsigned long long sig_off, unsigned long long add) {
  return from_bytes(h).signal(sig_w, sig_off, add);
}

int ln_flush(const void* h) { return from_bytes(h).flush(); }

int ln_wait(const void* h, unsigned w, unsigned long long off, unsigned long long value) {
  return from_bytes(h).wait(w, off, value);
}

// `threads` producers, each putting `per_thread` records of `bytes` bytes
// (slot = thread * per_thread + i) from local window src_w into remote
// window dst_w, each followed by a signal add of 1. Returns the first
// non-ok status, or 0. statuses (optional, `threads` entries) gets each.
int ln_put_signal_many(const void* h, int threads, int per_thread, unsigned dst_w, unsigned src_w,
                       unsigned long long bytes, unsigned sig_w, unsigned long long sig_off, int* statuses) {
  const lamina::DeviceChannel ch = from_bytes(h);
  std::vector<int> result(threads, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        const unsigned long long slot = static_cast<unsigned long long>(t) * per_thread + i;
        int s = ch.put_signal(dst_w, slot * bytes, src_w, slot * bytes, bytes, sig_w, sig_off, 1);
        if (s != 0) {
          result[t] = s;
          return;
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  int first = 0;
  for (int t = 0; t < threads; ++t) {
    if (statuses) statuses[t] = result[t];
    if (first == 0) first = result[t];
  }
  return first;
}

}  // extern "C"
