#include "transports/verbs/verbs_device.hpp"

#include <arpa/inet.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <vector>

#include "common/error.hpp"
#include "transports/verbs/verbs_settings.hpp"

namespace lamina::verbs {

void ContextDeleter::operator()(ibv_context* context) const { ibverbs_api(nullptr)->close_device(context); }
void PdDeleter::operator()(ibv_pd* pd) const { ibverbs_api(nullptr)->dealloc_pd(pd); }
void MrDeleter::operator()(ibv_mr* mr) const { ibverbs_api(nullptr)->dereg_mr(mr); }
void CqDeleter::operator()(ibv_cq* cq) const { ibverbs_api(nullptr)->destroy_cq(cq); }
void QpDeleter::operator()(ibv_qp* qp) const { ibverbs_api(nullptr)->destroy_qp(qp); }
void CompChannelDeleter::operator()(ibv_comp_channel* channel) const {
  ibverbs_api(nullptr)->destroy_comp_channel(channel);
}

std::string gid_to_string(const ibv_gid& gid) {
  char text[INET6_ADDRSTRLEN] = {};
  if (inet_ntop(AF_INET6, gid.raw, text, sizeof(text)) == nullptr) return "?";
  return text;
}

namespace {

[[noreturn]] void unavailable(const std::string& why) { throw_system("verbs not available: " + why); }

// Closes the device list on every path.
struct DeviceList {
  const IbverbsApi& api;
  ibv_device** list = nullptr;
  int count = 0;
  explicit DeviceList(const IbverbsApi& a) : api(a) { list = api.get_device_list(&count); }
  ~DeviceList() {
    if (list != nullptr) api.free_device_list(list);
  }
  DeviceList(const DeviceList&) = delete;
  DeviceList& operator=(const DeviceList&) = delete;
};

bool gid_is_zero(const ibv_gid& gid) {
  static const ibv_gid zero{};
  return std::memcmp(gid.raw, zero.raw, sizeof(gid.raw)) == 0;
}

bool gid_is_ipv4_mapped(const ibv_gid& gid) {
  static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return std::memcmp(gid.raw, prefix, sizeof(prefix)) == 0;
}

// The kernel exposes each GID's type in sysfs ("RoCE v2", "IB/RoCE v1"); the
// libibverbs call for it is newer than the oldest library we accept.
std::string gid_type(const std::string& device, int port, int index) {
  std::ifstream file("/sys/class/infiniband/" + device + "/ports/" + std::to_string(port) +
                     "/gid_attrs/types/" + std::to_string(index));
  std::string type;
  std::getline(file, type);
  return type;
}

bool port_is_active(const IbverbsApi& api, ibv_context* context, int port, ibv_port_attr* attr) {
  return api.query_port(context, static_cast<uint8_t>(port), attr) == 0 && attr->state == IBV_PORT_ACTIVE;
}

const char* port_state_name(ibv_port_state state) {
  switch (state) {
    case IBV_PORT_NOP: return "NOP";
    case IBV_PORT_DOWN: return "DOWN";
    case IBV_PORT_INIT: return "INIT";
    case IBV_PORT_ARMED: return "ARMED";
    case IBV_PORT_ACTIVE: return "ACTIVE";
    case IBV_PORT_ACTIVE_DEFER: return "ACTIVE_DEFER";
  }
  return "UNKNOWN";
}

}  // namespace

std::shared_ptr<VerbsDevice> VerbsDevice::open(const VerbsOptions& options) {
  const IbverbsApi& api = ibverbs_api_or_throw();
  std::string wanted_device = options.device.empty() ? ib_setting_string("IB_DEVICE") : options.device;
  int wanted_port = options.port > 0 ? options.port : static_cast<int>(ib_setting_int("IB_PORT", 0, 0, 255));
  int wanted_gid = options.gid_index >= 0 ? options.gid_index
                                          : static_cast<int>(ib_setting_int("IB_GID_INDEX", -1, -1, 65535));

  DeviceList devices(api);
  if (devices.list == nullptr || devices.count == 0) {
    const int error = errno;
    unavailable("no RDMA devices (ibv_get_device_list " +
                (devices.list == nullptr ? "failed: " + std::string(std::strerror(error)) : std::string("found none")) +
                "; is a driver such as mlx5_ib or rdma_rxe loaded, and /dev/infiniband accessible?)");
  }

  std::shared_ptr<VerbsDevice> device(new VerbsDevice());
  device->api_ = &api;
  std::string seen;  // for error messages: what each device looked like
  for (int i = 0; i < devices.count && !device->context_; ++i) {
    const std::string name = api.get_device_name(devices.list[i]);
    if (!wanted_device.empty() && name != wanted_device) {
      seen += (seen.empty() ? "" : ", ") + name;
      continue;
    }
    UniqueContext context(api.open_device(devices.list[i]));
    if (!context) {
      seen += (seen.empty() ? "" : ", ") + name + " (cannot open: errno " + std::to_string(errno) + ")";
      continue;
    }
    ibv_device_attr device_attr{};
    if (api.query_device(context.get(), &device_attr) != 0) {
      seen += (seen.empty() ? "" : ", ") + name + " (ibv_query_device failed)";
      continue;
    }
    int chosen_port = -1;
    ibv_port_attr port_attr{};
    std::string port_states;
    for (int port = 1; port <= device_attr.phys_port_cnt; ++port) {
      if (wanted_port > 0 && port != wanted_port) continue;
      ibv_port_attr attr{};
      if (port_is_active(api, context.get(), port, &attr)) {
        chosen_port = port;
        port_attr = attr;
        break;
      }
      port_states += " port " + std::to_string(port) + " " + port_state_name(attr.state);
    }
    if (chosen_port < 0) {
      if (wanted_port > device_attr.phys_port_cnt) {
        throw_usage("verbs: device " + name + " has no port " + std::to_string(wanted_port) + " (it has " +
                    std::to_string(device_attr.phys_port_cnt) + ")");
      }
      seen += (seen.empty() ? "" : ", ") + name + " (no ACTIVE port:" + port_states + ")";
      continue;
    }
    device->context_ = std::move(context);
    device->name_ = name;
    device->port_ = static_cast<uint8_t>(chosen_port);
    device->port_attr_ = port_attr;
    device->device_attr_ = device_attr;
  }
  if (!device->context_) {
    if (!wanted_device.empty() && seen.find(wanted_device) == std::string::npos) {
      unavailable("no RDMA device named '" + wanted_device + "' (found: " + seen + ")");
    }
    unavailable("no usable RDMA port (" + seen + ")");
  }

  // GID: on RoCE the GID is the address; on InfiniBand the LID routes and GID 0 is enough.
  const std::string& name = device->name_;
  const int port = device->port_;
  const int table = device->port_attr_.gid_tbl_len;
  std::string chosen_type;
  if (wanted_gid >= 0) {
    if (wanted_gid >= table) {
      throw_usage("verbs: GID index " + std::to_string(wanted_gid) + " is outside the table of " + name +
                  " port " + std::to_string(port) + " (" + std::to_string(table) + " entries)");
    }
    ibv_gid gid{};
    if (api.query_gid(device->context(), static_cast<uint8_t>(port), wanted_gid, &gid) != 0 || gid_is_zero(gid)) {
      throw_usage("verbs: GID index " + std::to_string(wanted_gid) + " of " + name + " port " +
                  std::to_string(port) + " is empty");
    }
    device->gid_index_ = wanted_gid;
    device->gid_ = gid;
    chosen_type = gid_type(name, port, wanted_gid);
  } else if (!device->is_ethernet()) {
    device->gid_index_ = 0;
    api.query_gid(device->context(), static_cast<uint8_t>(port), 0, &device->gid_);
    chosen_type = "IB";
  } else {
    int best_score = 0;
    for (int index = 0; index < table; ++index) {
      ibv_gid gid{};
      if (api.query_gid(device->context(), static_cast<uint8_t>(port), index, &gid) != 0 || gid_is_zero(gid)) {
        continue;
      }
      const std::string type = gid_type(name, port, index);
      const bool v2 = type == "RoCE v2";
      const int score = v2 && gid_is_ipv4_mapped(gid) ? 3 : v2 ? 2 : 1;
      if (score > best_score) {
        best_score = score;
        device->gid_index_ = index;
        device->gid_ = gid;
        chosen_type = type;
      }
    }
    if (best_score == 0) {
      unavailable(name + " port " + std::to_string(port) +
                  " has no GID (RoCE needs an IP address on the Ethernet interface under it)");
    }
  }

  device->pd_.reset(api.alloc_pd(device->context()));
  if (!device->pd_) throw_system("verbs: ibv_alloc_pd on " + name + " failed: errno " + std::to_string(errno));
  device->description_ = name + " port " + std::to_string(port) + " gid[" + std::to_string(device->gid_index_) +
                         "] " + gid_to_string(device->gid_) + (chosen_type.empty() ? "" : " (" + chosen_type + ")");
  return device;
}

}  // namespace lamina::verbs
