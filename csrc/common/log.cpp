#include "common/log.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace lamina {
namespace {

LogLevel level_from_env() {
  const char* v = std::getenv("LAMINA_NET_LOG");
  if (!v) return LogLevel::kWarn;
  if (!std::strcmp(v, "error")) return LogLevel::kError;
  if (!std::strcmp(v, "info")) return LogLevel::kInfo;
  if (!std::strcmp(v, "debug")) return LogLevel::kDebug;
  return LogLevel::kWarn;
}

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kError: return "error";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kInfo: return "info";
    default: return "debug";
  }
}

}  // namespace

bool log_enabled(LogLevel level) {
  static const LogLevel configured = level_from_env();
  return static_cast<int>(level) <= static_cast<int>(configured);
}

void log_message(LogLevel level, const std::string& message) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  std::fprintf(stderr, "[lamina-net %s pid %d] %s\n", level_name(level), static_cast<int>(getpid()),
               message.c_str());
}

}  // namespace lamina
