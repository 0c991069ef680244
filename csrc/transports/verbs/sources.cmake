# Verbs transport sources (included by CMakeLists.txt when infiniband/verbs.h
# is found). libibverbs and libcuda are dlopen'ed at run time: nothing links.
set(LAMINA_VERBS_SOURCES
  csrc/transports/verbs/ibverbs_api.cpp
  csrc/transports/verbs/cuda_dmabuf.cpp
  csrc/transports/verbs/verbs_device.cpp
  csrc/transports/verbs/qp_state.cpp
  csrc/transports/verbs/rc_connection.cpp
  csrc/transports/verbs/rxe_direct.cpp
  csrc/transports/verbs/direct_probe.cpp
  csrc/transports/verbs/verbs_transport.cpp
)
