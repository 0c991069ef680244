// lamina-net: a connection rendezvous through the store that no stale record can fool.
//
// Transports that connect by swapping blobs in the store (verbs: QP numbers)
// must not pair with what a previous process of the same rank left there: a
// peer that died, or a channel that failed and is being replaced, leaves its
// record under the same key, and a fresh peer that read it would connect to a
// queue pair that no longer exists (its writes then fail with "retry counter
// exceeded" long after both sides believed they were connected).
//
// Each call is one attempt with a random nonce. A side publishes
// (nonce, blob) under <prefix>/offer/<self>, reads the peer's offer, and
// announces which of the peer's nonces it took under a key naming both
// nonces. It is done when the peer announced the same pair; until then it
// rereads the peer's offer now and then and moves on to a newer one. A
// stale offer is never answered (its writer is gone), so both sides end on
// the pair of their current attempts. Keys are never deleted (the store has
// no delete); a rendezvous leaves three small keys per attempt pair.
#pragma once

#include <cstdint>
#include <string>

#include "common/clock.hpp"
#include "common/kv_store.hpp"

namespace lamina {

struct RendezvousResult {
  std::string peer_blob;
  uint64_t self_nonce = 0;
  uint64_t peer_nonce = 0;
};

// Swaps `blob` with the peer's current attempt. Throws kTimeout at
// `deadline` (naming `what` and the peer), kSystem on a store failure.
// Both sides must call it with the same prefix and mirrored ranks.
RendezvousResult rendezvous(KeyValueStore& store, const std::string& prefix, int self_rank, int peer_rank,
                            const std::string& blob, Deadline deadline, const std::string& what);

// The second step of a two-step connect: announces that this side finished
// its part for the pair `agreed` and waits until the peer did the same.
// The key names both nonces, so no earlier attempt's announcement counts.
void rendezvous_barrier(KeyValueStore& store, const std::string& prefix, int self_rank, int peer_rank,
                        const RendezvousResult& agreed, const std::string& step, Deadline deadline,
                        const std::string& what);

}  // namespace lamina
