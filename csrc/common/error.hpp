// lamina-net: status and error types shared by every layer.
//
// Contract: every failure that crosses a public boundary is an `Error` with one
// of three kinds, translated once into Python exception types:
//   kUsage   - the caller asked for something invalid (bad slice, closed object,
//              missing access right). Nothing was sent or written.
//   kSystem  - the OS, the network, a peer or a transport failed (connection
//              reset, verbs work completion error, peer closed). The channel
//              that saw it is failed and stays failed (sticky).
//   kTimeout - a bounded wait expired; the message names what was awaited.
#pragma once

#include <stdexcept>
#include <string>

namespace lamina {

enum class ErrorKind { kUsage = 1, kSystem = 2, kTimeout = 3 };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] inline void throw_usage(const std::string& what) { throw Error(ErrorKind::kUsage, what); }
[[noreturn]] inline void throw_system(const std::string& what) { throw Error(ErrorKind::kSystem, what); }
[[noreturn]] inline void throw_timeout(const std::string& what) { throw Error(ErrorKind::kTimeout, what); }

// "<what>: <strerror(errnum)> (errno N)"
std::string errno_message(const std::string& what, int errnum);
[[noreturn]] void throw_errno(const std::string& what, int errnum);

}  // namespace lamina
