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

std::vector<DirectPathProbe> probe_direct_paths() {
  const std::string why = "lamina-net was built without libibverbs headers (install libibverbs-dev and rebuild)";
  return {DirectPathProbe{"direct-mlx5", false, "", {why}}, DirectPathProbe{"direct-rxe", false, "", {why}}};
}

}  // namespace lamina
