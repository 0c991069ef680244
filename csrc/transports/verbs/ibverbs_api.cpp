#include "transports/verbs/ibverbs_api.hpp"

#include <dlfcn.h>

#include <cstring>

#include "common/error.hpp"

namespace lamina::verbs {
namespace {

struct LoadResult {
  IbverbsApi api;
  bool ok = false;
  std::string why;
};

template <typename Fn>
bool bind(void* library, const char* symbol, Fn& slot, std::string* why) {
  slot = reinterpret_cast<Fn>(dlsym(library, symbol));
  if (slot == nullptr && why != nullptr) *why = std::string("libibverbs.so.1 has no symbol ") + symbol;
  return slot != nullptr;
}

LoadResult load() {
  LoadResult result;
  // RTLD_GLOBAL: the providers (librxe, libmlx5, ...) that libibverbs loads
  // resolve their ibv_* references against it.
  void* library = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (library == nullptr) {
    const char* error = dlerror();
    result.why = std::string("cannot load libibverbs.so.1 (install rdma-core / libibverbs1): ") +
                 (error != nullptr ? error : "unknown dlopen error");
    return result;
  }
  IbverbsApi& a = result.api;
  std::string* why = &result.why;
  result.ok = bind(library, "ibv_get_device_list", a.get_device_list, why) &&
              bind(library, "ibv_free_device_list", a.free_device_list, why) &&
              bind(library, "ibv_get_device_name", a.get_device_name, why) &&
              bind(library, "ibv_open_device", a.open_device, why) &&
              bind(library, "ibv_close_device", a.close_device, why) &&
              bind(library, "ibv_query_device", a.query_device, why) &&
              bind(library, "ibv_query_port", a.query_port_compat, why) &&
              bind(library, "ibv_query_gid", a.query_gid, why) &&
              bind(library, "ibv_alloc_pd", a.alloc_pd, why) &&
              bind(library, "ibv_dealloc_pd", a.dealloc_pd, why) &&
              bind(library, "ibv_reg_mr", a.reg_mr, why) &&
              bind(library, "ibv_dereg_mr", a.dereg_mr, why) &&
              bind(library, "ibv_create_cq", a.create_cq, why) &&
              bind(library, "ibv_destroy_cq", a.destroy_cq, why) &&
              bind(library, "ibv_create_comp_channel", a.create_comp_channel, why) &&
              bind(library, "ibv_destroy_comp_channel", a.destroy_comp_channel, why) &&
              bind(library, "ibv_get_cq_event", a.get_cq_event, why) &&
              bind(library, "ibv_ack_cq_events", a.ack_cq_events, why) &&
              bind(library, "ibv_create_qp", a.create_qp, why) &&
              bind(library, "ibv_modify_qp", a.modify_qp, why) &&
              bind(library, "ibv_destroy_qp", a.destroy_qp, why) &&
              bind(library, "ibv_wc_status_str", a.wc_status_str, why);
  if (result.ok) bind(library, "ibv_reg_dmabuf_mr", a.reg_dmabuf_mr, nullptr);  // optional
  return result;
}

}  // namespace

int IbverbsApi::query_port(ibv_context* context, uint8_t port, ibv_port_attr* attr) const {
  std::memset(attr, 0, sizeof(*attr));
  return query_port_compat(context, port, reinterpret_cast<_compat_ibv_port_attr*>(attr));
}

const IbverbsApi* ibverbs_api(std::string* why) {
  static const LoadResult loaded = load();  // thread-safe one-time init
  if (!loaded.ok) {
    if (why != nullptr) *why = loaded.why;
    return nullptr;
  }
  return &loaded.api;
}

const IbverbsApi& ibverbs_api_or_throw() {
  std::string why;
  const IbverbsApi* api = ibverbs_api(&why);
  if (api == nullptr) throw_system("verbs not available: " + why);
  return *api;
}

}  // namespace lamina::verbs
