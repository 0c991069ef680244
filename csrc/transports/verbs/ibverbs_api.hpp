// lamina-net verbs: libibverbs loaded at run time.
//
// The library is dlopen'ed ("libibverbs.so.1") on first use and every ibv_*
// function we call is looked up with dlsym, so lamina-net loads and imports on
// machines without rdma-core. Functions that verbs.h defines static inline
// and that dispatch through ctx->ops (ibv_post_send, ibv_post_recv,
// ibv_poll_cq, ibv_req_notify_cq) need no lookup and are called directly.
// Never call a verbs.h function that is an inline wrapper around an exported
// symbol (ibv_reg_mr, ibv_query_port, ibv_get_device_list are such macros):
// that would add a link-time dependency on libibverbs. Use the pointers below.
#pragma once

#include <infiniband/verbs.h>

#include <string>

namespace lamina::verbs {

struct IbverbsApi {
  ibv_device** (*get_device_list)(int* num_devices) = nullptr;
  void (*free_device_list)(ibv_device** list) = nullptr;
  const char* (*get_device_name)(ibv_device* device) = nullptr;
  ibv_context* (*open_device)(ibv_device* device) = nullptr;
  int (*close_device)(ibv_context* context) = nullptr;
  int (*query_device)(ibv_context* context, ibv_device_attr* attr) = nullptr;
  // The exported symbol fills the pre-1.1 prefix of ibv_port_attr (all the
  // fields we read); pass a zeroed ibv_port_attr through query_port().
  int (*query_port_compat)(ibv_context* context, uint8_t port, _compat_ibv_port_attr* attr) = nullptr;
  int (*query_gid)(ibv_context* context, uint8_t port, int index, ibv_gid* gid) = nullptr;
  ibv_pd* (*alloc_pd)(ibv_context* context) = nullptr;
  int (*dealloc_pd)(ibv_pd* pd) = nullptr;
  ibv_mr* (*reg_mr)(ibv_pd* pd, void* addr, size_t length, int access) = nullptr;
  // Optional (rdma-core >= 34); null when the library is older.
  ibv_mr* (*reg_dmabuf_mr)(ibv_pd* pd, uint64_t offset, size_t length, uint64_t iova, int fd,
                           int access) = nullptr;
  int (*dereg_mr)(ibv_mr* mr) = nullptr;
  ibv_cq* (*create_cq)(ibv_context* context, int cqe, void* cq_context, ibv_comp_channel* channel,
                       int comp_vector) = nullptr;
  int (*destroy_cq)(ibv_cq* cq) = nullptr;
  ibv_comp_channel* (*create_comp_channel)(ibv_context* context) = nullptr;
  int (*destroy_comp_channel)(ibv_comp_channel* channel) = nullptr;
  int (*get_cq_event)(ibv_comp_channel* channel, ibv_cq** cq, void** cq_context) = nullptr;
  void (*ack_cq_events)(ibv_cq* cq, unsigned int count) = nullptr;
  ibv_qp* (*create_qp)(ibv_pd* pd, ibv_qp_init_attr* attr) = nullptr;
  int (*modify_qp)(ibv_qp* qp, ibv_qp_attr* attr, int mask) = nullptr;
  int (*destroy_qp)(ibv_qp* qp) = nullptr;
  const char* (*wc_status_str)(ibv_wc_status status) = nullptr;

  int query_port(ibv_context* context, uint8_t port, ibv_port_attr* attr) const;
};

// The loaded API, or null with *why naming the failed step (dlopen error or
// the missing symbol). Loads once; thread-safe; the library is never unloaded.
const IbverbsApi* ibverbs_api(std::string* why);

// The loaded API; throws kSystem "verbs not available: <why>" otherwise.
const IbverbsApi& ibverbs_api_or_throw();

}  // namespace lamina::verbs
