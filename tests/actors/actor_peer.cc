// A real dserve process for multi-process actor tests: starts an ActorRuntime, publishes the
// decode stand-in on 127.0.0.1:<port> (0 = any) and prints one line
//   READY port=<port> epoch=<epoch> pid=<pid>
// on stdout, then serves until killed. Usage: actor_peer [--port N] [--capacity TOKENS]

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dserve/actors/actor_runtime.h"
#include "fake_roles.h"

int main(int argc, char** argv) {
  using namespace dserve::actors;
  RuntimeConfig cfg;
  cfg.role = Role::kDecode;
  cfg.scheduler_threads = 1;
  uint32_t capacity = 4096;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const long value = std::strtol(argv[i + 1], nullptr, 10);
    if (flag == "--port" && value >= 0 && value <= 65535) {
      cfg.listen_port = static_cast<uint16_t>(value);
    } else if (flag == "--capacity" && value > 0) {
      capacity = static_cast<uint32_t>(value);
    } else {
      std::fprintf(stderr, "actor_peer: bad argument %s %s\n", argv[i], argv[i + 1]);
      return 2;
    }
  }
  auto rt = ActorRuntime::start(cfg);
  if (!rt.is_ok()) {
    std::fprintf(stderr, "actor_peer: %s\n", rt.status().to_string().c_str());
    return 1;
  }
  auto port = (*rt)->publish(testing::spawn_fake_decode((*rt)->system(), (*rt)->epoch(), capacity));
  if (!port.is_ok()) {
    std::fprintf(stderr, "actor_peer: %s\n", port.status().to_string().c_str());
    return 1;
  }
  std::printf("READY port=%u epoch=%llu pid=%d\n", static_cast<unsigned>(*port),
              static_cast<unsigned long long>((*rt)->epoch()), static_cast<int>(getpid()));
  std::fflush(stdout);
  // Serve until a signal ends the process (the tests use SIGKILL on purpose).
  for (;;)
    pause();
}
