#include "transports/rendezvous.hpp"

#include <algorithm>
#include <cstdio>
#include <random>

#include "common/error.hpp"

namespace lamina {
namespace {

std::string hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t random_nonce() {
  std::random_device device;
  uint64_t v = 0;
  while (v == 0) v = (static_cast<uint64_t>(device()) << 32) | device();
  return v;
}

// An offer is "<16 hex digits of nonce>;<blob>".
bool parse_offer(const std::string& offer, uint64_t* nonce, std::string* blob) {
  if (offer.size() < 17 || offer[16] != ';') return false;
  char* end = nullptr;
  const std::string digits = offer.substr(0, 16);
  *nonce = std::strtoull(digits.c_str(), &end, 16);
  if (end != digits.c_str() + 16 || *nonce == 0) return false;
  *blob = offer.substr(17);
  return true;
}

// Waits for `key` up to `slice_ms` (never past `deadline`); false if it is not there yet.
bool get_within(KeyValueStore& store, const std::string& key, int slice_ms, Deadline deadline, std::string* out) {
  const int ms = deadline.remaining_ms(slice_ms);
  if (ms <= 0) return false;
  try {
    *out = store.get(key, Deadline::after_seconds(ms / 1000.0));
    return true;
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kTimeout) throw;
    return false;
  }
}

std::string pair_key(const std::string& prefix, const char* step, int rank, uint64_t own, uint64_t other) {
  return prefix + "/" + step + "/" + std::to_string(rank) + "/" + hex(own) + "-" + hex(other);
}

}  // namespace

RendezvousResult rendezvous(KeyValueStore& store, const std::string& prefix, int self_rank, int peer_rank,
                            const std::string& blob, Deadline deadline, const std::string& what) {
  RendezvousResult out;
  out.self_nonce = random_nonce();
  const std::string peer_offer_key = prefix + "/offer/" + std::to_string(peer_rank);
  store.set(prefix + "/offer/" + std::to_string(self_rank), hex(out.self_nonce) + ";" + blob);
  const std::string peer_name = "rank " + std::to_string(peer_rank);
  std::string offer, taken;
  uint64_t announced = 0;  // the peer nonce this side announced it took
  int slice_ms = 10;
  for (;;) {
    // The peer's offer: absent until it starts, perhaps stale until it has.
    if (!get_within(store, peer_offer_key, std::max(slice_ms, 100), deadline, &offer)) {
      if (deadline.expired()) break;
      continue;
    }
    uint64_t nonce = 0;
    std::string peer_blob;
    if (!parse_offer(offer, &nonce, &peer_blob)) {
      throw_system(what + ": " + peer_name + " published a malformed offer (another lamina-net version?)");
    }
    if (nonce != announced) {
      store.set(pair_key(prefix, "took", self_rank, out.self_nonce, nonce), "1");
      announced = nonce;
      out.peer_blob = std::move(peer_blob);
      slice_ms = 10;
    }
    // Done once the peer took this attempt's offer while we took its current one.
    if (get_within(store, pair_key(prefix, "took", peer_rank, announced, out.self_nonce), slice_ms, deadline,
                   &taken)) {
      out.peer_nonce = announced;
      return out;
    }
    if (deadline.expired()) break;
    slice_ms = std::min(slice_ms * 2, 200);  // then look at the peer's offer again
  }
  throw_timeout(what + ": " + peer_name + (announced == 0 ? " did not publish its connection info in time"
                                                          : " did not answer this connection attempt in time"));
}

void rendezvous_barrier(KeyValueStore& store, const std::string& prefix, int self_rank, int peer_rank,
                        const RendezvousResult& agreed, const std::string& step, Deadline deadline,
                        const std::string& what) {
  store.set(pair_key(prefix, step.c_str(), self_rank, agreed.self_nonce, agreed.peer_nonce), "1");
  try {
    store.get(pair_key(prefix, step.c_str(), peer_rank, agreed.peer_nonce, agreed.self_nonce), deadline);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kTimeout) throw;
    throw_timeout(what + ": rank " + std::to_string(peer_rank) + " did not finish step '" + step + "' in time (" +
                  e.what() + ")");
  }
}

}  // namespace lamina
