// lamina-net: the tcp transport. Works between any two hosts.
//
// Each endpoint listens on one port (advertised through the store). For every
// channel the higher rank connects to the lower rank and both exchange a
// HelloFrame carrying the per-group secret; a connection that does not
// present it within a short bound is closed with a logged reason. After the
// handshake the socket is a ByteStream for StreamConnection, whose target side
// validates every inbound operation against the local RegionTable.
//
// Handshakes run concurrently in the accept thread (each with its own bound,
// at most kMaxPendingHandshakes at once), so a stranger that connects and
// sends nothing - or half a hello - delays nobody. Both ranks agree on the
// outcome: the acceptor's connect() sends one confirm byte when it takes the
// socket, and the dialer counts the channel connected only once it has it.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "common/error.hpp"
#include "common/log.hpp"
#include "common/settings.hpp"
#include "common/threads.hpp"
#include "transports/factory.hpp"
#include "transports/stream_connection.hpp"

namespace lamina {
namespace {

constexpr double kHelloTimeoutS = 5.0;
constexpr size_t kMaxPendingHandshakes = 64;
constexpr uint8_t kConfirmByte = 0xa5;

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.release();
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

void set_nonblocking(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) throw_errno("fcntl(O_NONBLOCK)", errno);
}

void tune_socket(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  int bytes = static_cast<int>(setting_int("TCP_BUFFER"));
  if (bytes > 0) {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
  }
}

// Reads/writes exactly `len` bytes on a non-blocking socket before `deadline`.
bool io_exact(int fd, void* buf, size_t len, bool writing, Deadline deadline, std::string* why) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = writing ? ::send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT) : ::recv(fd, p, len, MSG_DONTWAIT);
    if (n > 0) {
      p += n;
      len -= static_cast<size_t>(n);
      continue;
    }
    if (n == 0 && !writing) {
      *why = "connection closed during the handshake";
      return false;
    }
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      *why = errno_message(writing ? "send" : "recv", errno);
      return false;
    }
    if (deadline.expired()) {
      *why = "handshake timed out";
      return false;
    }
    struct pollfd pfd = {fd, static_cast<short>(writing ? POLLOUT : POLLIN), 0};
    ::poll(&pfd, 1, deadline.remaining_ms(100));
  }
  return true;
}

std::string channel_key_for_hello(const std::string& key) {
  if (key.size() < sizeof(HelloFrame::channel_key)) return key;
  return "h" + std::to_string(std::hash<std::string>{}(key));
}

class TcpStream : public ByteStream {
 public:
  TcpStream(Fd fd, int peer_rank) : fd_(std::move(fd)), peer_rank_(peer_rank) {
    event_fd_ = Fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (event_fd_.get() < 0) throw_errno("eventfd", errno);
  }
  size_t read_some(void* buf, size_t max, bool* eof) override {
    for (;;) {
      ssize_t n = ::recv(fd_.get(), buf, max, MSG_DONTWAIT);
      if (n > 0) return static_cast<size_t>(n);
      if (n == 0) {
        *eof = true;
        return 0;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      if (errno == ECONNRESET || errno == EPIPE || errno == ENOTCONN) {
        *eof = true;
        return 0;
      }
      throw_errno("recv from rank " + std::to_string(peer_rank_), errno);
    }
  }
  size_t write_some(const struct iovec* iov, int iovcnt) override {
    struct msghdr msg = {};
    msg.msg_iov = const_cast<struct iovec*>(iov);
    msg.msg_iovlen = static_cast<size_t>(iovcnt);
    for (;;) {
      ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n >= 0) return static_cast<size_t>(n);
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      throw_errno("send to rank " + std::to_string(peer_rank_) + " (peer gone?)", errno);
    }
  }
  void wait_readable(int timeout_ms, const std::function<bool()>* ready) override {
    if (ready && (*ready)()) return;
    struct pollfd pfds[2] = {{fd_.get(), POLLIN, 0}, {event_fd_.get(), POLLIN, 0}};
    int r = ::poll(pfds, 2, timeout_ms);
    if (r > 0 && (pfds[1].revents & POLLIN)) {
      uint64_t drained;
      ssize_t ignored = ::read(event_fd_.get(), &drained, sizeof(drained));
      (void)ignored;
    }
  }
  void wait_writable(int timeout_ms) override {
    struct pollfd pfd = {fd_.get(), POLLOUT, 0};
    ::poll(&pfd, 1, timeout_ms);
  }
  void wake() override { wake_eventfd(event_fd_.get()); }
  void shutdown() override { ::shutdown(fd_.get(), SHUT_RDWR); }

 private:
  Fd fd_;
  Fd event_fd_;
  int peer_rank_;
};

class TcpTransport : public Transport {
 public:
  explicit TcpTransport(const TransportContext& ctx) : ctx_(ctx) {
    listen_fd_ = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (listen_fd_.get() < 0) throw_errno("tcp transport: socket", errno);
    int one = 1;
    setsockopt(listen_fd_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    std::string host = ctx.tcp_host.empty() ? "127.0.0.1" : ctx.tcp_host;
    // Loopback-advertised endpoints listen on loopback only; others on all interfaces.
    addr.sin_addr.s_addr = host.rfind("127.", 0) == 0 ? htonl(INADDR_LOOPBACK) : htonl(INADDR_ANY);
    if (::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
      throw_errno("tcp transport: bind", errno);
    }
    if (::listen(listen_fd_.get(), 128) < 0) throw_errno("tcp transport: listen", errno);
    socklen_t len = sizeof(addr);
    getsockname(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    set_nonblocking(listen_fd_.get());
    // The accept thread sleeps until a peer dials or the transport goes (no
    // periodic wake-up to take a core from a spinning thread).
    stop_fd_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (stop_fd_.get() < 0) throw_errno("tcp transport: eventfd", errno);
    ctx_.store->set(ctx_.group_prefix + "/" + std::to_string(ctx_.rank) + "/tcp_addr",
                    host + ":" + std::to_string(port_));
    accept_thread_ = std::thread([this] {
      name_this_thread("lamina-accept");
      accept_loop();
    });
  }

  ~TcpTransport() override {
    stop_.store(true);
    if (stop_fd_.get() >= 0) wake_eventfd(stop_fd_.get());
    if (accept_thread_.joinable()) accept_thread_.join();
  }

  const char* name() const override { return "tcp"; }

  std::unique_ptr<Connection> connect(const ConnectParams& params) override {
    std::string key = channel_key_for_hello(params.key_prefix);
    Fd fd;
    if (params.self_rank < params.peer_rank) {
      fd = wait_accepted(key, params.peer_rank, params.deadline);
    } else {
      fd = dial(params, key);
    }
    tune_socket(fd.get());
    auto stream = std::make_unique<TcpStream>(std::move(fd), params.peer_rank);
    auto conn = std::make_unique<StreamConnection>("tcp", params.peer_rank, std::move(stream), params.regions,
                                                   params.on_inbound);
    conn->start();
    return conn;
  }

 private:
  HelloFrame make_hello(const std::string& key) const {
    HelloFrame hello;
    hello.rank = ctx_.rank;
    hello.secret_hi = ctx_.secret_hi;
    hello.secret_lo = ctx_.secret_lo;
    std::strncpy(hello.channel_key, key.c_str(), sizeof(hello.channel_key) - 1);
    return hello;
  }

  std::string check_hello(const HelloFrame& hello) const {
    return hello_problem(hello, HelloExpectation{ctx_.secret_hi, ctx_.secret_lo, ctx_.rank, ctx_.world_size});
  }

  Fd dial(const ConnectParams& params, const std::string& key) {
    const std::string addr_key = ctx_.group_prefix + "/" + std::to_string(params.peer_rank) + "/tcp_addr";
    std::string where;
    std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> holder(nullptr, freeaddrinfo);
    addrinfo* res = nullptr;
    std::string last_error = "not attempted";
    while (!params.deadline.expired()) {
      // Read the address again on every try: a restarted peer publishes a
      // new one, and the first read may have been its previous life's.
      std::string now = ctx_.store->get(addr_key, params.deadline);
      if (now != where || !res) {
        where = now;
        auto colon = where.rfind(':');
        if (colon == std::string::npos) throw_system("bad tcp address '" + where + "' in the store");
        std::string host = where.substr(0, colon), port = where.substr(colon + 1);
        struct addrinfo hints = {};
        hints.ai_family = AF_INET;
        hints.ai_socktype = SOCK_STREAM;
        res = nullptr;
        int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
        if (rc != 0 || !res) throw_system("cannot resolve " + where + ": " + gai_strerror(rc));
        holder.reset(res);
      }
      Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (fd.get() < 0) throw_errno("socket", errno);
      if (::connect(fd.get(), res->ai_addr, res->ai_addrlen) == 0) {
        set_nonblocking(fd.get());
        HelloFrame hello = make_hello(key), reply;
        std::string why;
        Deadline hello_deadline = Deadline::after_seconds(kHelloTimeoutS);
        if (!io_exact(fd.get(), &hello, sizeof(hello), true, hello_deadline, &why) ||
            !io_exact(fd.get(), &reply, sizeof(reply), false, hello_deadline, &why)) {
          throw_system("tcp handshake with rank " + std::to_string(params.peer_rank) + " at " + where +
                       " failed: " + why);
        }
        why = check_hello(reply);
        if (why.empty() && reply.rank != params.peer_rank) why = "answered as the wrong rank";
        if (why.empty() && key != reply.channel_key) why = "answered for another channel";
        if (!why.empty()) {
          throw_system("tcp handshake with rank " + std::to_string(params.peer_rank) + " at " + where +
                       " rejected: " + why);
        }
        // Connected only once the peer's connect() took this socket.
        uint8_t confirm = 0;
        if (!io_exact(fd.get(), &confirm, 1, false, params.deadline, &why) || confirm != kConfirmByte) {
          if (params.deadline.expired()) {
            throw_timeout("connecting tcp channel to rank " + std::to_string(params.peer_rank) + " at " + where +
                          ": the peer answered the handshake but did not take the connection in time");
          }
          throw_system("tcp handshake with rank " + std::to_string(params.peer_rank) + " at " + where +
                       " was not confirmed: " + (why.empty() ? "bad confirm byte" : why));
        }
        return fd;
      }
      last_error = errno_message("connect", errno);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    throw_timeout("connecting tcp channel to rank " + std::to_string(params.peer_rank) + " at " + where +
                  " timed out (" + last_error + ")");
  }

  Fd wait_accepted(const std::string& key, int peer_rank, Deadline deadline) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      auto it = accepted_.find(key);
      if (it != accepted_.end() && it->second.rank == peer_rank) {
        Fd fd = std::move(it->second.fd);
        accepted_.erase(it);
        std::string why;
        uint8_t confirm = kConfirmByte;
        if (!io_exact(fd.get(), &confirm, 1, true, deadline, &why)) {
          throw_system("tcp handshake with rank " + std::to_string(peer_rank) + " failed at its confirmation: " +
                       why);
        }
        return fd;
      }
      if (deadline.expired()) {
        throw_timeout("waiting for rank " + std::to_string(peer_rank) + " to connect its tcp channel (" + key + ")");
      }
      cv_.wait_for(lock, std::chrono::milliseconds(deadline.remaining_ms(100)));
    }
  }

  // One handshake in progress: the hello read so far, then the reply written.
  struct Pending {
    Fd fd;
    Deadline deadline;
    HelloFrame hello{};
    size_t got = 0;
    HelloFrame reply{};
    size_t sent = 0;
    bool replying = false;
  };

  // Advances one handshake; returns false when it is finished (accepted or dropped).
  bool step(Pending& p) {
    auto drop = [&](const std::string& why, bool warn) {
      if (warn) LAMINA_WARN("tcp transport: dropped an incoming connection: " + why);
      else LAMINA_INFO("tcp transport: dropped an incoming connection: " + why);
      return false;
    };
    if (!p.replying) {
      ssize_t n = ::recv(p.fd.get(), reinterpret_cast<char*>(&p.hello) + p.got, sizeof(p.hello) - p.got,
                         MSG_DONTWAIT);
      if (n == 0) return drop("connection closed during the handshake", false);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return true;
        return drop(errno_message("recv", errno), true);
      }
      p.got += static_cast<size_t>(n);
      if (p.got < sizeof(p.hello)) return true;
      std::string why = check_hello(p.hello);
      if (!why.empty()) {
        LAMINA_WARN("tcp transport: rejected an incoming connection: " + why);
        return false;
      }
      p.reply = make_hello(p.hello.channel_key);
      p.replying = true;
    }
    ssize_t n = ::send(p.fd.get(), reinterpret_cast<const char*>(&p.reply) + p.sent, sizeof(p.reply) - p.sent,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return true;
      return drop(errno_message("send", errno), true);
    }
    p.sent += static_cast<size_t>(n);
    if (p.sent < sizeof(p.reply)) return true;
    std::lock_guard<std::mutex> lock(mutex_);
    // A newer dial for the same channel (the dialer retried) replaces the older one.
    accepted_[p.hello.channel_key] = Accepted{p.hello.rank, std::move(p.fd)};
    cv_.notify_all();
    return false;
  }

  void accept_loop() {
    std::vector<Pending> pending;
    std::vector<struct pollfd> pfds;
    while (!stop_.load()) {
      pfds.clear();
      pfds.push_back({listen_fd_.get(), POLLIN, 0});
      pfds.push_back({stop_fd_.get(), POLLIN, 0});
      int timeout_ms = -1;
      for (auto& p : pending) {
        pfds.push_back({p.fd.get(), static_cast<short>(p.replying ? POLLOUT : POLLIN), 0});
        const int left = p.deadline.remaining_ms(1000);
        timeout_ms = timeout_ms < 0 ? left : std::min(timeout_ms, left);
      }
      if (::poll(pfds.data(), pfds.size(), timeout_ms) < 0 && errno != EINTR) continue;
      if (stop_.load()) break;
      // Advance the handshakes that are ready; drop the finished and the late.
      std::vector<Pending> still;
      for (size_t i = 0; i < pending.size(); ++i) {
        Pending& p = pending[i];
        bool keep = true;
        if (pfds[i + 2].revents) keep = step(p);
        if (keep && p.deadline.expired()) {
          LAMINA_WARN("tcp transport: dropped an incoming connection: handshake timed out after " +
                      std::to_string(p.got) + " of " + std::to_string(sizeof(p.hello)) + " hello bytes");
          keep = false;
        }
        if (keep) still.push_back(std::move(p));
      }
      pending.swap(still);
      if (!(pfds[0].revents & POLLIN)) continue;
      for (;;) {
        Fd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
        if (fd.get() < 0) break;
        if (pending.size() >= kMaxPendingHandshakes) {
          // The oldest unfinished handshake goes first: a flood of idle
          // strangers cannot keep a real peer out for long.
          LAMINA_WARN("tcp transport: " + std::to_string(kMaxPendingHandshakes) +
                      " handshakes pending; dropped the oldest");
          pending.erase(pending.begin());
        }
        Pending p;
        p.fd = std::move(fd);
        p.deadline = Deadline::after_seconds(kHelloTimeoutS);
        if (step(p)) pending.push_back(std::move(p));  // most hellos are there already
      }
    }
  }

  struct Accepted {
    int rank;
    Fd fd;
  };

  TransportContext ctx_;
  Fd listen_fd_;
  Fd stop_fd_;  // eventfd: written once, when the transport goes
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::string, Accepted> accepted_;
};

}  // namespace

std::unique_ptr<Transport> make_tcp_transport(const TransportContext& ctx) {
  return std::make_unique<TcpTransport>(ctx);
}

}  // namespace lamina
