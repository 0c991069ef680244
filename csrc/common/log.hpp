// lamina-net: minimal leveled logging to stderr.
// Level from LAMINA_NET_LOG (error, warn, info, debug); default warn.
#pragma once

#include <string>

namespace lamina {

enum class LogLevel { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

bool log_enabled(LogLevel level);
void log_message(LogLevel level, const std::string& message);

#define LAMINA_LOG(level, expr)                                  \
  do {                                                           \
    if (::lamina::log_enabled(level)) {                          \
      ::lamina::log_message(level, (expr));                      \
    }                                                            \
  } while (0)
#define LAMINA_WARN(expr) LAMINA_LOG(::lamina::LogLevel::kWarn, expr)
#define LAMINA_INFO(expr) LAMINA_LOG(::lamina::LogLevel::kInfo, expr)
#define LAMINA_DEBUG(expr) LAMINA_LOG(::lamina::LogLevel::kDebug, expr)

}  // namespace lamina
