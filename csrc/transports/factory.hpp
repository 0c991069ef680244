// lamina-net: constructing transports. One function per transport; a transport
// that cannot be used here throws kSystem "<name> not available: <reason>".
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "transports/transport.hpp"

namespace lamina {

// What every transport of one endpoint shares.
struct TransportContext {
  int rank = 0;
  int world_size = 1;
  std::string group_prefix;   // store key prefix of the endpoint group, e.g. "ln/default"
  KeyValueStore* store = nullptr;
  RegionTable* regions = nullptr;
  uint64_t secret_hi = 0;     // per-group secret handed out through the store
  uint64_t secret_lo = 0;
  uint64_t host_id = 0;       // hash of hostname + boot id
  double connect_timeout_s = 60.0;
  std::string tcp_host;       // address the tcp transport advertises to peers
};

std::unique_ptr<Transport> make_tcp_transport(const TransportContext& ctx);
std::unique_ptr<Transport> make_shm_transport(const TransportContext& ctx);

// Verbs (RDMA, RC). Device/port/GID selection: empty/negative means "from
// LAMINA_NET_IB_DEVICE / _IB_PORT / _IB_GID_INDEX, else the first active port
// and its RoCE v2 GID".
struct VerbsOptions {
  std::string device;
  int port = -1;
  int gid_index = -1;
};
std::unique_ptr<Transport> make_verbs_transport(const TransportContext& ctx, const VerbsOptions& options);
// Whether verbs can be used on this host; on false, *why says which check failed
// (no libibverbs, no device, no active port, ...). Cheap enough to call once.
bool verbs_available(std::string* why);

// One direct back end of the device API (the caller writes the NIC's work
// requests itself) and whether this host can use it. Each failed check is one
// line; checks after the first failure that could not be made say so.
struct DirectPathProbe {
  std::string path;                 // "direct-mlx5" or "direct-rxe"
  bool available = false;
  std::string detail;               // when available: the device and who may call it
  std::vector<std::string> failed;  // when not: every failed check
};
// Probes both direct back ends (opens verbs devices; creates no queue pair).
std::vector<DirectPathProbe> probe_direct_paths();

}  // namespace lamina
