#include "common/error.hpp"

#include <cstring>

namespace lamina {

std::string errno_message(const std::string& what, int errnum) {
  return what + ": " + std::strerror(errnum) + " (errno " + std::to_string(errnum) + ")";
}

void throw_errno(const std::string& what, int errnum) { throw_system(errno_message(what, errnum)); }

}  // namespace lamina
