// lamina-net verbs: the Transport (device, memory registration, connect) and
// the factory functions declared in transports/factory.hpp.
#include <cerrno>
#include <cstdio>
#include <memory>
#include <string>

#include "common/error.hpp"
#include "transports/factory.hpp"
#include "transports/verbs/cuda_dmabuf.hpp"
#include "transports/verbs/rc_connection.hpp"
#include "transports/verbs/verbs_device.hpp"

namespace lamina {
namespace verbs {
namespace {

// A region's MR; keeps the device (and so the PD) alive while it exists.
struct VerbsRegistration final : TransportRegistration {
  std::shared_ptr<VerbsDevice> device;
  UniqueMr mr;  // declared after device: deregistered first
  std::string method;  // "host", "dma-buf" or "peer memory"
};

int access_flags(uint32_t access) {
  int flags = 0;
  if (access & kAccessRemoteWrite) flags |= IBV_ACCESS_REMOTE_WRITE;
  if (access & kAccessRemoteRead) flags |= IBV_ACCESS_REMOTE_READ;
  if (access & kAccessRemoteAtomic) flags |= IBV_ACCESS_REMOTE_ATOMIC;
  // Verbs requires local write whenever the NIC may write into the memory.
  // Without it a read-only source (e.g. bytes) can still be registered.
  if (flags & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC)) flags |= IBV_ACCESS_LOCAL_WRITE;
  return flags;
}

std::string describe_region(const Region& region) {
  char address[32];
  std::snprintf(address, sizeof(address), "%p", region.base);
  return std::to_string(region.size) + " bytes at " + address + " (" + access_to_string(region.access) + ")";
}

class VerbsTransport final : public Transport {
 public:
  explicit VerbsTransport(std::shared_ptr<VerbsDevice> device)
      : device_(std::move(device)), config_(RcConfig::from_settings()) {}

  const char* name() const override { return "verbs"; }

  void register_region(Region& region) override {
    auto registration = std::make_unique<VerbsRegistration>();
    registration->device = device_;
    const int flags = access_flags(region.access);
    if (region.kind == MemoryKind::kCuda) {
      register_cuda(region, flags, *registration);
    } else {
      registration->mr.reset(device_->api().reg_mr(device_->pd(), region.base, region.size, flags));
      if (!registration->mr) {
        const int error = errno;
        std::string hint;
        if (error == ENOMEM || error == EPERM || error == EAGAIN) hint = " (locked-memory limit, ulimit -l, too low?)";
        if (error == EFAULT) hint = " (memory not mapped, or read-only memory registered for writing)";
        throw_system(errno_message("verbs: ibv_reg_mr of " + describe_region(region) + " on " + device_->name() +
                                       " failed" + hint,
                                   error));
      }
      registration->method = "host";
    }
    region.lkey = registration->mr->lkey;
    region.rkey = registration->mr->rkey;
    region.registrations[kSlotVerbs] = std::move(registration);
  }

  void deregister_region(Region& region) override {
    region.registrations[kSlotVerbs].reset();
    region.lkey = 0;
    region.rkey = 0;
  }

  std::unique_ptr<Connection> connect(const ConnectParams& params) override {
    return RcConnection::connect(device_, params, config_);
  }

 private:
  // dma-buf first (needs no kernel module besides the NIC driver), then the
  // nvidia-peermem path (ibv_reg_mr on the device pointer).
  void register_cuda(Region& region, int flags, VerbsRegistration& registration) {
    const IbverbsApi& api = device_->api();
    std::string dmabuf_failure;
    if (api.reg_dmabuf_mr == nullptr) {
      dmabuf_failure = "libibverbs has no ibv_reg_dmabuf_mr (rdma-core < 34)";
    } else {
      DmabufExport exported = export_cuda_dmabuf(region.base, region.size, &dmabuf_failure);
      if (exported.valid()) {
        registration.mr.reset(api.reg_dmabuf_mr(device_->pd(), exported.offset(), region.size,
                                                reinterpret_cast<uint64_t>(region.base), exported.fd(), flags));
        if (registration.mr) {
          registration.method = "dma-buf";
          return;
        }
        dmabuf_failure = errno_message("ibv_reg_dmabuf_mr failed", errno);
      }
    }
    registration.mr.reset(api.reg_mr(device_->pd(), region.base, region.size, flags));
    if (registration.mr) {
      registration.method = "peer memory";
      return;
    }
    const std::string peermem_failure =
        errno_message("ibv_reg_mr on the device pointer failed (is nvidia-peermem loaded?)", errno);
    throw_system("verbs: cannot register CUDA memory (device " + std::to_string(region.device) + ", " +
                 describe_region(region) + ") on " + device_->name() + ": dma-buf: " + dmabuf_failure +
                 "; peer memory: " + peermem_failure);
  }

  std::shared_ptr<VerbsDevice> device_;
  RcConfig config_;
};

}  // namespace
}  // namespace verbs

std::unique_ptr<Transport> make_verbs_transport(const TransportContext& ctx, const VerbsOptions& options) {
  (void)ctx;  // connection parameters arrive per connect(); nothing endpoint-wide is needed
  return std::make_unique<verbs::VerbsTransport>(verbs::VerbsDevice::open(options));
}

bool verbs_available(std::string* why) {
  try {
    verbs::VerbsDevice::open(VerbsOptions{});
    return true;
  } catch (const Error& e) {
    static const std::string prefix = "verbs not available: ";
    std::string reason = e.what();
    if (reason.rfind(prefix, 0) == 0) reason.erase(0, prefix.size());
    if (why != nullptr) *why = reason;
    return false;
  }
}

}  // namespace lamina
