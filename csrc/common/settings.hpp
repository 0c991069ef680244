// lamina-net: the one registry of LAMINA_NET_* environment settings.
//
// Every tunable is declared in settings.cpp with its default and a one-line
// description; `lamina-net info` prints the table. Values are read from the
// environment each time they are asked for (cheap; only at setup time).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lamina {

struct SettingInfo {
  std::string name;           // without the LAMINA_NET_ prefix
  std::string default_value;
  std::string description;
};

const std::vector<SettingInfo>& all_settings();

// Value of LAMINA_NET_<name>, or the registered default. Throws kUsage for an
// unregistered name (so typos in code are caught by tests).
std::string setting_string(const std::string& name);
int64_t setting_int(const std::string& name);
double setting_double(const std::string& name);

// LAMINA_NET_SPIN_US as a number. "auto" (the default) is 100 us, or 0 when
// the host is oversubscribed by the job itself: LOCAL_WORLD_SIZE (torchrun's,
// and lamina-net's local launchers') is above the CPUs this process may run
// on. A spinning waiter then takes the core that the rank it waits for needs.
uint64_t spin_window_us();

}  // namespace lamina
