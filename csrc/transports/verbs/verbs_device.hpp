// lamina-net verbs: RAII owners of verbs objects, and the opened device with
// the port and GID this endpoint uses.
//
// Selection (VerbsOptions first, then LAMINA_NET_IB_DEVICE / IB_PORT /
// IB_GID_INDEX, then automatic): the first device with an ACTIVE port; its
// first ACTIVE port; on Ethernet (RoCE) the first RoCE v2 GID that is an
// IPv4-mapped address, else the first RoCE v2 GID, else the first non-zero
// GID; on InfiniBand GID 0 and the port LID. Every failure names the check
// that failed and what was found instead.
//
// Lifetimes: a VerbsDevice is shared (shared_ptr) by the transport, every
// memory registration and every connection made from it, so the protection
// domain and context outlive every object created in them.
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <memory>
#include <string>

#include "transports/factory.hpp"
#include "transports/verbs/ibverbs_api.hpp"

namespace lamina::verbs {

// Deleters call the loaded API (loaded before any object can exist, never unloaded).
struct ContextDeleter { void operator()(ibv_context* context) const; };
struct PdDeleter { void operator()(ibv_pd* pd) const; };
struct MrDeleter { void operator()(ibv_mr* mr) const; };
struct CqDeleter { void operator()(ibv_cq* cq) const; };
struct QpDeleter { void operator()(ibv_qp* qp) const; };
struct CompChannelDeleter { void operator()(ibv_comp_channel* channel) const; };
using UniqueContext = std::unique_ptr<ibv_context, ContextDeleter>;
using UniquePd = std::unique_ptr<ibv_pd, PdDeleter>;
using UniqueMr = std::unique_ptr<ibv_mr, MrDeleter>;
using UniqueCq = std::unique_ptr<ibv_cq, CqDeleter>;
using UniqueQp = std::unique_ptr<ibv_qp, QpDeleter>;
using UniqueCompChannel = std::unique_ptr<ibv_comp_channel, CompChannelDeleter>;

// "::ffff:10.99.0.1" style text of a GID.
std::string gid_to_string(const ibv_gid& gid);

class VerbsDevice {
 public:
  // Opens and selects; throws kSystem "verbs not available: <reason>" when no
  // usable device/port/GID exists, kUsage for invalid explicit choices.
  static std::shared_ptr<VerbsDevice> open(const VerbsOptions& options);

  const IbverbsApi& api() const { return *api_; }
  ibv_context* context() const { return context_.get(); }
  ibv_pd* pd() const { return pd_.get(); }
  const std::string& name() const { return name_; }
  uint8_t port() const { return port_; }
  int gid_index() const { return gid_index_; }
  const ibv_gid& gid() const { return gid_; }
  const ibv_port_attr& port_attr() const { return port_attr_; }
  const ibv_device_attr& device_attr() const { return device_attr_; }
  bool is_ethernet() const { return port_attr_.link_layer == IBV_LINK_LAYER_ETHERNET; }
  bool supports_atomics() const { return device_attr_.atomic_cap != IBV_ATOMIC_NONE; }
  // e.g. "rxe0 port 1 gid[1] ::ffff:10.99.0.1 (RoCE v2)"
  const std::string& description() const { return description_; }

 private:
  VerbsDevice() = default;

  const IbverbsApi* api_ = nullptr;
  UniqueContext context_;
  UniquePd pd_;  // declared after context_: destroyed first
  std::string name_;
  uint8_t port_ = 0;
  int gid_index_ = -1;
  ibv_gid gid_{};
  ibv_port_attr port_attr_{};
  ibv_device_attr device_attr_{};
  std::string description_;
};

}  // namespace lamina::verbs
