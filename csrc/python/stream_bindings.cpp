// lamina-net: bindings of the stream-ordered operations (csrc/proxy/stream_ops.hpp)
// and of the small CUDA helpers the Python layer needs; part of `_core`,
// called from module.cpp once DeviceProxy, Region and Channel are bound.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "channels/endpoint.hpp"
#include "common/error.hpp"
#include "memory/cuda_memory.hpp"
#include "memory/region.hpp"
#include "proxy/device_proxy.hpp"
#include "proxy/stream_ops.hpp"

namespace py = pybind11;

namespace lamina {

namespace {

DeviceChannel gpu_handle(const DeviceProxy& p) {
  if (p.closed()) throw_usage("device channel is closed");
  if (!p.gpu()) {
    throw_usage("stream-ordered operations need a GPU device channel (ch.device(..., gpu=True)): this one's ring "
                "is in plain host memory, for CPU producers");
  }
  return p.handle();
}

StreamWaitMethod method_from(const std::string& m) {
  if (m == "kernel") return StreamWaitMethod::kKernel;
  if (m == "mem_op") return StreamWaitMethod::kMemOp;
  if (m == "auto") return StreamWaitMethod::kAuto;
  throw_usage("stream wait method must be 'kernel', 'mem_op' or 'auto', got '" + m + "'");
}

uint64_t timeout_ns(double seconds) {
  if (!(seconds > 0)) throw_usage("stream wait: the timeout must be > 0 seconds");
  const double ns = seconds * 1e9;
  return ns >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(ns);
}

}  // namespace

void bind_stream_ops(py::module_& m) {
  m.attr("HAVE_CUDA_KERNELS") = stream_ops_built();
  m.def("stream_mem_ops_supported", [] {
    std::string why;
    const bool ok = stream_mem_ops_supported(&why);
    return py::make_tuple(ok, why);
  });
  m.def("cuda_stream_synchronize", [](uintptr_t stream) {
    py::gil_scoped_release release;
    cuda_stream_synchronize(stream);
  });
  // Host staging of send/recv of GPU memory (lamina_net/core.py): a blocking copy on lamina-net's stream.
  m.def("cuda_copy", [](uintptr_t dst, uintptr_t src, uint64_t len) {
    py::gil_scoped_release release;
    cuda_copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), len);
  });

  auto proxy = py::reinterpret_borrow<py::class_<DeviceProxy, std::shared_ptr<DeviceProxy>>>(m.attr("DeviceProxy"));
  proxy.def(
      "add_windows",
      [](DeviceProxy& p, std::vector<std::shared_ptr<Region>> local, std::vector<RegionDescriptor> remote) {
        DeviceChannel h = p.add_windows(std::move(local), std::move(remote));
        return py::bytes(reinterpret_cast<const char*>(&h), sizeof(h));
      },
      py::arg("local"), py::arg("remote"));
  proxy.def_property_readonly("timeout_ns", [](const DeviceProxy& p) { return p.handle().timeout_ns; });

  auto channel = py::reinterpret_borrow<py::class_<Channel, std::shared_ptr<Channel>>>(m.attr("Channel"));
  channel.def(
      "signal",
      [](Channel& ch, const RegionDescriptor& dst, uint64_t offset, uint64_t add, double timeout) {
        py::gil_scoped_release release;
        ch.signal(RemoteWord{dst, offset, add}, timeout);
      },
      py::arg("dst"), py::arg("offset"), py::arg("add"), py::arg("timeout"));

  py::class_<StreamOps, std::shared_ptr<StreamOps>>(m, "StreamOps")
      .def(py::init([] {
        py::gil_scoped_release release;
        return std::make_shared<StreamOps>();
      }))
      .def("put",
           [](StreamOps& s, const DeviceProxy& p, uintptr_t stream, uint32_t dst_window, uint64_t dst_offset,
              uint32_t src_window, uint64_t src_offset, uint64_t nbytes) {
             const DeviceChannel h = gpu_handle(p);
             py::gil_scoped_release release;
             s.put(h, stream, dst_window, dst_offset, src_window, src_offset, nbytes);
           })
      .def("put_signal",
           [](StreamOps& s, const DeviceProxy& p, uintptr_t stream, uint32_t dst_window, uint64_t dst_offset,
              uint32_t src_window, uint64_t src_offset, uint64_t nbytes, uint32_t signal_window,
              uint64_t signal_offset, uint64_t add) {
             const DeviceChannel h = gpu_handle(p);
             py::gil_scoped_release release;
             s.put_signal(h, stream, dst_window, dst_offset, src_window, src_offset, nbytes, signal_window,
                          signal_offset, add);
           })
      .def("signal",
           [](StreamOps& s, const DeviceProxy& p, uintptr_t stream, uint32_t signal_window, uint64_t signal_offset,
              uint64_t add) {
             const DeviceChannel h = gpu_handle(p);
             py::gil_scoped_release release;
             s.signal(h, stream, signal_window, signal_offset, add);
           })
      // The word at `offset` of `region`; with `proxy`, that channel's error
      // word ends the wait early and is set when it times out. timeout <= 0
      // with a proxy: the proxy's (the handle's) bound.
      .def(
          "wait",
          [](StreamOps& s, const Region& region, uint64_t offset, uint64_t value, double timeout,
             const DeviceProxy* p, uintptr_t stream, const std::string& method, uint32_t window) {
            if (region.closed.load()) throw_usage("stream wait: the region is closed");
            if (offset % 8 != 0 || !region.contains(offset, 8)) {
              throw_usage("stream wait: offset " + std::to_string(offset) + " is not an aligned u64 inside the "
                          "region of " + std::to_string(region.size) + " bytes");
            }
            DeviceRingControl* control = nullptr;
            uint64_t bound = 0;
            if (p != nullptr) {
              const DeviceChannel h = gpu_handle(*p);
              control = h.control;
              bound = h.timeout_ns;
            }
            if (timeout > 0 || p == nullptr) bound = timeout_ns(timeout);
            const StreamWaitMethod how = method_from(method);
            const void* word = static_cast<const char*>(region.base) + offset;
            py::gil_scoped_release release;
            s.wait(word, region.kind == MemoryKind::kCuda, value, bound, control, stream, how, window, offset);
          },
          py::arg("region"), py::arg("offset"), py::arg("value"), py::arg("timeout"), py::arg("proxy").none(true),
          py::arg("stream"), py::arg("method"), py::arg("window"))
      .def_property_readonly("error", &StreamOps::error)
      .def_property_readonly("failures", [](const StreamOps& s) { return s.status().failures; })
      .def_property_readonly("status", [](const StreamOps& s) { return s.status().status; })
      .def_property_readonly("auto_method", [](StreamOps& s) {
        return s.auto_method() == StreamWaitMethod::kMemOp ? "mem_op" : "kernel";
      });
}

}  // namespace lamina
