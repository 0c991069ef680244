// lamina-net common: naming the library's own threads, so that top, perf and
// /proc/<pid>/task/*/comm tell them apart from the application's.
#pragma once

#include <pthread.h>

namespace lamina {

// `name` is at most 15 characters (the kernel's limit); longer names are cut.
inline void name_this_thread(const char* name) {
  char buffer[16] = {};
  for (int i = 0; i < 15 && name[i] != '\0'; ++i) buffer[i] = name[i];
  pthread_setname_np(pthread_self(), buffer);
}

}  // namespace lamina
