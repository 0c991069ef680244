// lamina-net verbs: the capability probe of the device API's direct back ends.
#include <dlfcn.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "memory/cuda_memory.hpp"
#include "transports/factory.hpp"
#include "transports/verbs/rxe_direct.hpp"
#include "transports/verbs/verbs_device.hpp"

namespace lamina {

namespace {

struct DeviceProvider {
  std::string name;
  std::string provider;  // the provider library's file name ("libmlx5.so.1", "librxe-rdmav34.so")
};

// Every verbs device with the provider library behind its post path.
std::vector<DeviceProvider> device_providers(const verbs::IbverbsApi& api) {
  std::vector<DeviceProvider> out;
  int count = 0;
  ibv_device** list = api.get_device_list(&count);
  if (list == nullptr) return out;
  for (int i = 0; i < count; ++i) {
    DeviceProvider d;
    d.name = api.get_device_name(list[i]);
    if (ibv_context* ctx = api.open_device(list[i])) {
      Dl_info info{};
      if (ctx->ops.post_send != nullptr && dladdr(reinterpret_cast<void*>(ctx->ops.post_send), &info) != 0 &&
          info.dli_fname != nullptr) {
        const char* slash = std::strrchr(info.dli_fname, '/');
        d.provider = slash != nullptr ? slash + 1 : info.dli_fname;
      }
      api.close_device(ctx);
    }
    out.push_back(d);
  }
  api.free_device_list(list);
  return out;
}

std::string list_devices(const std::vector<DeviceProvider>& devices) {
  if (devices.empty()) return "none";
  std::string s;
  for (const auto& d : devices) {
    if (!s.empty()) s += ", ";
    s += d.name + " (" + (d.provider.empty() ? std::string("provider unknown") : d.provider) + ")";
  }
  return s;
}

DirectPathProbe probe_mlx5(const std::vector<DeviceProvider>& devices) {
  DirectPathProbe p;
  p.path = "direct-mlx5";
  if (void* lib = dlopen("libmlx5.so.1", RTLD_NOW | RTLD_LOCAL)) {
    dlclose(lib);
  } else {
    const char* err = dlerror();
    p.failed.push_back(std::string("libmlx5 not loadable: ") + (err != nullptr ? err : "unknown error"));
  }
  bool any_mlx5 = false;
  for (const auto& d : devices) any_mlx5 = any_mlx5 || d.provider.find("libmlx5") != std::string::npos;
  if (!any_mlx5) p.failed.push_back("not an mlx5 device: verbs devices here: " + list_devices(devices));
  if (!cuda_built()) p.failed.push_back("CUDA missing: lamina-net was built without CUDA");
  // The host side that would make the queues (DEVX umems in GPU memory, a UAR
  // mapped with cudaHostRegisterIoMemory) is not in this build, so DEVX
  // permission, dma-buf / peermem, UAR mapping and atomics are not probed.
  p.failed.push_back("mlx5 host setup (DEVX queue pairs, UAR mapping) not built yet: the mlx5 work-request format "
                     "is byte-tested only; DEVX, dma-buf/peermem, UAR mapping and atomics not checked");
  return p;
}

DirectPathProbe probe_rxe(const std::vector<DeviceProvider>& devices) {
  DirectPathProbe p;
  p.path = "direct-rxe";
  for (const auto& d : devices) {
    if (d.provider.find("librxe") == std::string::npos) continue;
    try {
      VerbsOptions options;
      options.device = d.name;
      auto device = verbs::VerbsDevice::open(options);
      const std::string why = verbs::rxe_direct_unavailable(*device);
      if (!why.empty()) {
        p.failed.push_back(why);
        continue;
      }
      p.available = true;
      p.detail = d.name + ", rdma-core " + verbs::rdma_core_version() +
                 ": CPU callers; the caller kicks or the queue's host thread does (the rings are not mapped into a GPU yet)";
      p.failed.clear();
      return p;
    } catch (const Error& e) {
      p.failed.push_back(d.name + ": " + e.what());
    }
  }
  if (p.failed.empty()) p.failed.push_back("no Soft-RoCE (rxe) device: verbs devices here: " + list_devices(devices));
  return p;
}

}  // namespace

std::vector<DirectPathProbe> probe_direct_paths() {
  std::string why;
  const verbs::IbverbsApi* api = verbs::ibverbs_api(&why);
  if (api == nullptr) {
    const std::string line = "libibverbs not loadable: " + why;
    return {DirectPathProbe{"direct-mlx5", false, "", {line}}, DirectPathProbe{"direct-rxe", false, "", {line}}};
  }
  const std::vector<DeviceProvider> devices = device_providers(*api);
  return {probe_mlx5(devices), probe_rxe(devices)};
}

}  // namespace lamina
