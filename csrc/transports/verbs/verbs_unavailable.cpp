// lamina-net: stand-in used when the build had no verbs headers.
#include "common/error.hpp"
#include "transports/factory.hpp"

namespace lamina {

std::unique_ptr<Transport> make_verbs_transport(const TransportContext&, const VerbsOptions&) {
  throw_system("verbs not available: lamina-net was built without libibverbs headers (install libibverbs-dev and rebuild)");
}

bool verbs_available(std::string* why) {
  *why = "lamina-net was built without libibverbs headers (install libibverbs-dev and rebuild)";
  return false;
}

}  // namespace lamina
