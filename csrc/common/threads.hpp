// lamina-net common: the library's own threads - naming them, so that top,
// perf and /proc/<pid>/task/*/comm tell them apart from the application's,
// and waking one that sleeps in poll() on an eventfd.
#pragma once

#include <pthread.h>
#include <unistd.h>

#include <cstdint>

namespace lamina {

// `name` is at most 15 characters (the kernel's limit); longer names are cut.
inline void name_this_thread(const char* name) {
  char buffer[16] = {};
  for (int i = 0; i < 15 && name[i] != '\0'; ++i) buffer[i] = name[i];
  pthread_setname_np(pthread_self(), buffer);
}

// One write of 1 to the eventfd `fd`; a full counter already means "wake
// up", so the result is not needed.
inline void wake_eventfd(int fd) {
  const uint64_t one = 1;
  ssize_t ignored = ::write(fd, &one, sizeof(one));
  (void)ignored;
}

}  // namespace lamina
