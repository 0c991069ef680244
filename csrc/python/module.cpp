// lamina-net: the private compiled module `lamina_net._core`.
//
// A thin binding: raw pointers and byte counts in, C++ objects out. Everything
// Python-specific (array protocols, argument defaults, docs) lives in the
// lamina_net package. Blocking calls release the GIL; C++ errors are
// translated once into lamina_net.errors exception types.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "channels/bandwidth.hpp"
#include "channels/endpoint.hpp"
#include "channels/pingpong.hpp"
#include "common/error.hpp"
#include "common/settings.hpp"
#include "memory/cuda_memory.hpp"
#include "memory/region.hpp"
#include "proxy/device_pingpong.hpp"
#include "proxy/device_proxy.hpp"
#include "transports/factory.hpp"
#include "transports/rendezvous.hpp"

namespace py = pybind11;
using namespace lamina;

namespace lamina {
void bind_stream_ops(py::module_& m);  // stream_bindings.cpp
}

namespace {

// KeyValueStore backed by a Python object with set(key, bytes) and
// get(key, timeout_s) -> bytes (see lamina_net/store.py).
class PyStore : public KeyValueStore {
 public:
  explicit PyStore(py::object store) : store_(std::move(store)) {}
  ~PyStore() override {
    py::gil_scoped_acquire gil;
    store_ = py::object();
  }
  void set(const std::string& key, const std::string& value) override {
    py::gil_scoped_acquire gil;
    call([&] { store_.attr("set")(key, py::bytes(value)); });
  }
  std::string get(const std::string& key, Deadline deadline) override {
    py::gil_scoped_acquire gil;
    double remaining = deadline.at_ns() == UINT64_MAX ? 3600.0 : deadline.remaining_ms(3600 * 1000) / 1000.0;
    std::string out;
    call([&] { out = store_.attr("get")(key, remaining).cast<std::string>(); });
    return out;
  }

 private:
  template <typename F>
  void call(F&& f) {
    try {
      f();
    } catch (py::error_already_set& e) {
      std::string what = e.what();
      if (e.matches(PyExc_TimeoutError)) throw_timeout("store: " + what);
      throw_system("store: " + what);
    }
  }
  py::object store_;
};

// The rounds of a ping-pong, as both bench bindings take them.
void fill_rounds(PingPongConfig& c, const std::string& op, uint64_t size, int iterations, int warmup, bool initiator,
                 double timeout, uint64_t signal_base) {
  c.op = op;
  c.size = size;
  c.iterations = iterations;
  c.warmup = warmup;
  c.initiator = initiator;
  c.timeout_s = timeout;
  c.signal_base = signal_base;
}

RegionDescriptor descriptor_from(const py::bytes& blob) { return RegionDescriptor::deserialize(std::string(blob)); }

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lamina-net compiled core (private; use the lamina_net package)";

  py::module_ errors = py::module_::import("lamina_net.errors");
  static py::object usage_error = errors.attr("UsageError");
  static py::object transport_error = errors.attr("TransportError");
  static py::object timeout_error = errors.attr("TimeoutError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      switch (e.kind()) {
        case ErrorKind::kUsage: PyErr_SetString(usage_error.ptr(), e.what()); break;
        case ErrorKind::kTimeout: PyErr_SetString(timeout_error.ptr(), e.what()); break;
        default: PyErr_SetString(transport_error.ptr(), e.what()); break;
      }
    }
  });

  m.attr("ACCESS_LOCAL") = static_cast<uint32_t>(kAccessLocal);
  m.attr("ACCESS_REMOTE_WRITE") = static_cast<uint32_t>(kAccessRemoteWrite);
  m.attr("ACCESS_REMOTE_READ") = static_cast<uint32_t>(kAccessRemoteRead);
  m.attr("ACCESS_REMOTE_ATOMIC") = static_cast<uint32_t>(kAccessRemoteAtomic);
  m.attr("ACCESS_ALL") = static_cast<uint32_t>(kAccessAll);
  m.attr("HAVE_VERBS") = static_cast<bool>(LAMINA_HAVE_VERBS);
#ifdef LAMINA_HAVE_CUDA
  m.attr("HAVE_CUDA") = true;
#else
  m.attr("HAVE_CUDA") = false;
#endif
  m.attr("DESCRIPTOR_BYTES") = RegionDescriptor::kWireSize;

  m.def("settings", [] {
    std::vector<std::tuple<std::string, std::string, std::string, std::string>> out;
    for (const auto& s : all_settings()) out.emplace_back(s.name, s.default_value, setting_string(s.name), s.description);
    return out;
  });
  m.def("spin_window_us", &spin_window_us);  // LAMINA_NET_SPIN_US resolved (auto: from LOCAL_WORLD_SIZE)
  // The device API's direct back ends: [(path, available, detail, [failed checks])].
  m.def("direct_paths", [] {
    std::vector<std::tuple<std::string, bool, std::string, std::vector<std::string>>> out;
    for (const auto& p : probe_direct_paths()) out.emplace_back(p.path, p.available, p.detail, p.failed);
    return out;
  });
  m.def("verbs_available", [] {
    std::string why;
    bool ok = verbs_available(&why);
    return py::make_tuple(ok, why);
  });

  // The bandwidth stream's byte pattern, for tests of its integrity check.
  m.def("bandwidth_pattern", [](uint64_t size, uint64_t stamp) {
    std::string out(size, '\0');
    fill_bandwidth_pattern(out.data(), size, stamp);
    return py::bytes(out);
  });
  m.def("check_bandwidth_pattern", [](const py::buffer& data, uint64_t stamp) {
    py::buffer_info info = data.request();
    if (info.ndim != 1 || info.strides[0] != info.itemsize) {
      throw_usage("check_bandwidth_pattern: needs contiguous 1-D data");
    }
    const auto nbytes = static_cast<uint64_t>(info.size * info.itemsize);
    return check_bandwidth_pattern(static_cast<const char*>(info.ptr), nbytes, stamp);
  });

  // The store rendezvous of the verbs connect, for tests that plant stale records.
  m.def("rendezvous", [](py::object store, const std::string& prefix, int self_rank, int peer_rank,
                         const py::bytes& blob, double timeout) {
    PyStore kv(std::move(store));
    RendezvousResult r;
    {
      py::gil_scoped_release release;
      r = rendezvous(kv, prefix, self_rank, peer_rank, std::string(blob), Deadline::after_seconds(timeout),
                     "rendezvous");
      rendezvous_barrier(kv, prefix, self_rank, peer_rank, r, "done", Deadline::after_seconds(timeout), "rendezvous");
    }
    return py::make_tuple(py::bytes(r.peer_blob), r.self_nonce, r.peer_nonce);
  });

  m.attr("DEVICE_CHANNEL_BYTES") = sizeof(DeviceChannel);
  m.attr("DEVICE_ABI_VERSION") = kDeviceAbiVersion;
  m.attr("DEVICE_MAX_WINDOWS") = kMaxDeviceWindows;
  m.def("cuda_versions", &cuda_versions);

  py::class_<DeviceProxy, std::shared_ptr<DeviceProxy>>(m, "DeviceProxy")
      .def(py::init([](Endpoint& ep, std::shared_ptr<Channel> ch, std::vector<std::shared_ptr<Region>> local,
                       std::vector<RegionDescriptor> remote, uint64_t ring_slots, double timeout, bool gpu,
                       int64_t spin_us) {
             DeviceProxyOptions o;
             o.ring_slots = ring_slots;
             o.timeout_s = timeout;
             o.gpu = gpu;
             o.spin_us = spin_us;
             py::gil_scoped_release release;
             if (ep.closed()) throw_usage("endpoint is closed");
             auto proxy = std::make_shared<DeviceProxy>(ep, std::move(ch), std::move(local), std::move(remote), o);
             ep.attach(proxy);
             return proxy;
           }),
           py::arg("endpoint"), py::arg("channel"), py::arg("local"), py::arg("remote"), py::arg("ring_slots"),
           py::arg("timeout"), py::arg("gpu"), py::arg("spin_us"))
      .def("handle_bytes",
           [](const DeviceProxy& p) {
             DeviceChannel h = p.handle();
             return py::bytes(reinterpret_cast<const char*>(&h), sizeof(h));
           })
      .def_property_readonly("error_code", &DeviceProxy::error_code)
      .def_property_readonly("error", &DeviceProxy::error)
      .def_property_readonly("gpu", &DeviceProxy::gpu)
      .def_property_readonly("device_path", &DeviceProxy::device_path)
      .def_property_readonly("closed", &DeviceProxy::closed)
      .def("stats",
           [](const DeviceProxy& p) {
             DeviceProxyStats s = p.stats();
             py::dict d;
             d["executed"] = s.executed;
             d["parks"] = s.parks;
             d["flushes"] = s.flushes;
             return d;
           })
      .def("close", [](DeviceProxy& p) {
        py::gil_scoped_release release;
        p.close();
      });

  py::class_<OpState, std::shared_ptr<OpState>>(m, "Op")
      .def_property_readonly("done", &OpState::done)
      .def_property_readonly("failed", &OpState::failed)
      .def_property_readonly("value", &OpState::value)
      .def_property_readonly("error", &OpState::error);

  py::class_<Region, std::shared_ptr<Region>>(m, "Region")
      .def_readonly("id", &Region::id)
      .def_property_readonly("base", [](const Region& r) { return reinterpret_cast<uintptr_t>(r.base); })
      .def_readonly("size", &Region::size)
      .def_readonly("access", &Region::access)
      .def_property_readonly("closed", [](const Region& r) { return r.closed.load(); })
      .def("load_u64", [](const Region& r, uint64_t offset) {
        if (offset % 8 || !r.contains(offset, 8)) throw_usage("offset is not an aligned u64 inside the region");
        // GPU memory: the CPU cannot load it; a copy on lamina-net's own stream.
        if (r.kind == MemoryKind::kCuda) return cuda_read_u64(static_cast<const char*>(r.base) + offset);
        return __atomic_load_n(reinterpret_cast<const uint64_t*>(static_cast<const char*>(r.base) + offset),
                               __ATOMIC_ACQUIRE);
      });

  py::class_<SharedAllocation, std::shared_ptr<SharedAllocation>>(m, "SharedAllocation", py::buffer_protocol())
      .def(py::init<uint64_t>())
      .def_property_readonly("nbytes", &SharedAllocation::size)
      .def_property_readonly("ptr", [](const SharedAllocation& a) { return reinterpret_cast<uintptr_t>(a.data()); })
      .def_buffer([](SharedAllocation& a) {
        return py::buffer_info(a.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(a.size())}, {1});
      });

  py::class_<RegionDescriptor>(m, "Descriptor")
      .def_static("from_bytes", &descriptor_from)
      .def("to_bytes", [](const RegionDescriptor& d) { return py::bytes(d.serialize()); })
      .def_readonly("owner_rank", &RegionDescriptor::owner_rank)
      .def_readonly("region_id", &RegionDescriptor::region_id)
      .def_readonly("size", &RegionDescriptor::size)
      .def_readonly("access", &RegionDescriptor::access)
      .def_readonly("addr", &RegionDescriptor::addr)
      .def_readonly("rkey", &RegionDescriptor::rkey)
      .def_readonly("group_id", &RegionDescriptor::group_id)
      .def_readonly("shared_fd", &RegionDescriptor::shared_fd)
      .def_property_readonly("is_cuda", [](const RegionDescriptor& d) { return d.kind == MemoryKind::kCuda; });

  py::class_<Channel, std::shared_ptr<Channel>>(m, "Channel")
      .def_property_readonly("peer", &Channel::peer)
      .def_property_readonly("transport", &Channel::transport)
      .def_property_readonly("closed", &Channel::closed)
      .def(
          "put",
          [](Channel& ch, uintptr_t src, uint64_t len, const RegionDescriptor& dst, uint64_t dst_offset,
             const RegionDescriptor* signal, uint64_t signal_offset, uint64_t signal_add, bool want_completion,
             double timeout, bool src_device) {
            py::gil_scoped_release release;
            RemoteWord word;
            if (signal) word = RemoteWord{*signal, signal_offset, signal_add};
            return ch.put(reinterpret_cast<const void*>(src), len, dst, dst_offset, signal ? &word : nullptr,
                          want_completion, timeout, src_device);
          },
          py::arg("src"), py::arg("nbytes"), py::arg("dst"), py::arg("dst_offset"), py::arg("signal").none(true),
          py::arg("signal_offset"), py::arg("signal_add"), py::arg("want_completion"), py::arg("timeout"),
          py::arg("src_device") = false)
      .def(
          "put_many",
          // puts: (src, nbytes, dst, dst_offset, signal or None, signal_offset, signal_add, src_device) each.
          [](Channel& ch, const py::list& puts, bool want_completion, double timeout) {
            std::vector<PutOp> ops(puts.size());
            for (size_t i = 0; i < ops.size(); ++i) {
              auto t = puts[i].cast<py::tuple>();
              if (t.size() != 8) throw_usage("put_many: each put is an 8-tuple");
              PutOp& op = ops[i];
              op.src.ptr = reinterpret_cast<const void*>(t[0].cast<uintptr_t>());
              op.src.len = t[1].cast<uint64_t>();
              op.dst = RemoteSlice{t[2].cast<RegionDescriptor>(), t[3].cast<uint64_t>()};
              op.has_signal = !t[4].is_none();
              if (op.has_signal) op.signal = RemoteWord{t[4].cast<RegionDescriptor>(), t[5].cast<uint64_t>(),
                                                        t[6].cast<uint64_t>()};
              op.src.device = t[7].cast<bool>();
            }
            py::gil_scoped_release release;
            return ch.put_many(ops, want_completion, timeout);
          },
          py::arg("puts"), py::arg("want_completion"), py::arg("timeout"))
      .def("atomic_add",
           [](Channel& ch, const RegionDescriptor& dst, uint64_t offset, uint64_t value, double timeout) {
             py::gil_scoped_release release;
             return ch.atomic_add(dst, offset, value, timeout);
           })
      .def("send",
           [](Channel& ch, uintptr_t data, uint64_t len, double timeout) {
             py::gil_scoped_release release;
             return ch.send(reinterpret_cast<const void*>(data), len, timeout);
           })
      .def("recv",
           [](Channel& ch, uintptr_t buffer, uint64_t capacity) {
             return ch.recv(reinterpret_cast<void*>(buffer), capacity);
           })
      .def("flush",
           [](Channel& ch, double timeout) {
             py::gil_scoped_release release;
             return ch.flush(timeout);
           })
      .def("wait",
           [](Channel& ch, const std::shared_ptr<OpState>& op, double timeout, const std::string& what) {
             py::gil_scoped_release release;
             ch.wait(op, timeout, what);
           })
      .def("test", &Channel::test)
      .def("failed",
           [](const Channel& ch) {
             std::string why;
             bool f = ch.failed(&why);
             return py::make_tuple(f, why);
           })
      .def("close", [](Channel& ch) {
        py::gil_scoped_release release;
        ch.close();
      });

  py::class_<Endpoint, std::shared_ptr<Endpoint>>(m, "Endpoint")
      .def(py::init([](int rank, int world_size, py::object store, const std::string& group, double timeout,
                       const std::string& tcp_host, const std::vector<std::string>& transports,
                       const std::string& ib_device, int ib_port, int ib_gid_index) {
             EndpointOptions o;
             o.rank = rank;
             o.world_size = world_size;
             o.group = group;
             o.timeout_s = timeout;
             o.tcp_host = tcp_host;
             o.transports = transports;
             o.verbs.device = ib_device;
             o.verbs.port = ib_port;
             o.verbs.gid_index = ib_gid_index;
             auto kv = std::make_shared<PyStore>(std::move(store));
             py::gil_scoped_release release;
             return std::make_shared<Endpoint>(o, kv);
           }),
           py::arg("rank"), py::arg("world_size"), py::arg("store"), py::arg("group"), py::arg("timeout"),
           py::arg("tcp_host"), py::arg("transports"), py::arg("ib_device"), py::arg("ib_port"),
           py::arg("ib_gid_index"))
      .def_property_readonly("rank", &Endpoint::rank)
      .def_property_readonly("world_size", &Endpoint::world_size)
      .def_property_readonly("closed", &Endpoint::closed)
      .def_property_readonly("default_timeout", &Endpoint::default_timeout)
      .def(
          "register_memory",
          [](Endpoint& ep, uintptr_t base, uint64_t size, uint32_t access, bool cuda, int device,
             const SharedAllocation* shared) {
            py::gil_scoped_release release;
            auto start = reinterpret_cast<uintptr_t>(shared ? shared->data() : nullptr);
            const bool inside =
                shared && base >= start && base - start <= shared->size() && size <= shared->size() - (base - start);
            return ep.register_memory(reinterpret_cast<void*>(base), size, access,
                                      cuda ? MemoryKind::kCuda : MemoryKind::kHost, device,
                                      inside ? shared->fd() : -1, inside ? base - start : 0);
          },
          py::arg("base"), py::arg("size"), py::arg("access"), py::arg("cuda"), py::arg("device"),
          py::arg("shared").none(true) = nullptr)
      .def("deregister",
           [](Endpoint& ep, uint64_t id, double timeout) {
             py::gil_scoped_release release;
             ep.deregister(id, timeout);
           })
      .def("describe", &Endpoint::describe)
      .def("channel",
           [](Endpoint& ep, int peer, const std::string& transport, int tag, double timeout) {
             py::gil_scoped_release release;
             return ep.channel(peer, transport, tag, timeout);
           })
      .def("choose_transport",
           [](Endpoint& ep, int peer, double timeout) {
             py::gil_scoped_release release;
             std::string why;
             std::string t = ep.choose_transport(peer, Deadline::after_seconds(timeout), &why);
             return std::make_pair(t, why);
           })
      .def("available_transports",
           [](const Endpoint& ep) {
             std::string why;
             auto names = ep.available_transports(&why);
             return std::make_pair(names, why);
           })
      .def(
          "wait_signal",
          [](Endpoint& ep, const Region& region, uint64_t offset, uint64_t value, double timeout, Channel* channel) {
            py::gil_scoped_release release;
            ep.wait_signal(region, offset, value, timeout, channel);
          },
          py::arg("region"), py::arg("offset"), py::arg("value"), py::arg("timeout"), py::arg("channel").none(true))
      .def("pingpong",
           [](Endpoint& ep, Channel& ch, const std::string& op, uint64_t size, int iterations, int warmup,
              bool initiator, double timeout, Region& buffer, Region& signal, const RegionDescriptor& remote_buffer,
              const RegionDescriptor& remote_signal, uint64_t signal_base) {
             PingPongConfig c;
             fill_rounds(c, op, size, iterations, warmup, initiator, timeout, signal_base);
             py::gil_scoped_release release;
             return run_pingpong(ep, ch, c, buffer, signal, remote_buffer, remote_signal);
           })
      // The windowed put stream of `bench bandwidth` (channels/bandwidth.hpp):
      // returns {seconds, bytes, puts, verified, first_bad, signals_seen}.
      .def("bandwidth",
           [](Endpoint& ep, Channel& ch, uint64_t size, int window, int iterations, int warmup, bool sender,
              double timeout, Region& buffer, Region& signal, const RegionDescriptor& remote_buffer,
              const RegionDescriptor& remote_signal, uint64_t signal_base) {
             BandwidthConfig c;
             c.size = size;
             c.window = window;
             c.iterations = iterations;
             c.warmup = warmup;
             c.sender = sender;
             c.timeout_s = timeout;
             c.signal_base = signal_base;
             BandwidthResult r;
             {
               py::gil_scoped_release release;
               r = run_bandwidth(ep, ch, c, buffer, signal, remote_buffer, remote_signal);
             }
             py::dict d;
             d["seconds"] = r.seconds;
             d["bytes"] = r.bytes;
             d["puts"] = r.puts;
             d["verified"] = r.verified;
             d["first_bad"] = r.first_bad;
             d["signals_seen"] = r.signals_seen;
             return d;
           })
      // The device-API paths of the benchmarks (csrc/proxy/device_pingpong.hpp):
      // returns (round-trip ns per measured iteration, {device_path, executed, parks, flushes}).
      .def("device_pingpong",
           [](Endpoint& ep, std::shared_ptr<Channel> ch, uint64_t size, int iterations, int warmup, bool initiator,
              double timeout, std::shared_ptr<Region> buffer, std::shared_ptr<Region> signal,
              const RegionDescriptor& remote_buffer, const RegionDescriptor& remote_signal, uint64_t signal_base,
              uint64_t ring_slots, int64_t spin_us) {
             DevicePingPongConfig c;
             fill_rounds(c, "put", size, iterations, warmup, initiator, timeout, signal_base);
             c.ring_slots = ring_slots;
             c.spin_us = spin_us;
             DeviceRunInfo info;
             std::vector<double> times;
             {
               py::gil_scoped_release release;
               times = run_device_pingpong(ep, ch, c, buffer, signal, remote_buffer, remote_signal, &info);
             }
             py::dict d;
             d["device_path"] = info.device_path;
             d["executed"] = info.stats.executed;
             d["parks"] = info.stats.parks;
             d["flushes"] = info.stats.flushes;
             return py::make_tuple(times, d);
           })
      // Put rate: returns {ops, seconds} (device: also device_path, executed, parks).
      .def("put_rate",
           [](Endpoint& ep, std::shared_ptr<Channel> ch, const std::string& path, int producers, uint64_t size,
              uint64_t ops, double timeout, const RegionDescriptor& remote, uint64_t ring_slots, int64_t spin_us) {
             if (path != "host" && path != "device") throw_usage("put rate path must be 'host' or 'device'");
             PutRateConfig c;
             c.producers = producers;
             c.size = size;
             c.ops = ops;
             c.timeout_s = timeout;
             c.ring_slots = ring_slots;
             c.spin_us = spin_us;
             PutRateResult r;
             {
               py::gil_scoped_release release;
               r = path == "device" ? run_device_put_rate(ep, ch, c, remote) : run_host_put_rate(ep, *ch, c, remote);
             }
             py::dict d;
             d["ops"] = r.ops;
             d["seconds"] = r.seconds;
             if (path == "device") {
               d["device_path"] = r.info.device_path;
               d["executed"] = r.info.stats.executed;
               d["parks"] = r.info.stats.parks;
               d["flushes"] = r.info.stats.flushes;
             }
             return d;
           })
      .def("close", [](Endpoint& ep) {
        py::gil_scoped_release release;
        ep.close();
      });

  bind_stream_ops(m);
}
