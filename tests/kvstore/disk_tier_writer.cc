// disk_tier_writer PATH RUN: opens a DiskTier at PATH and puts the blocks of workload run RUN
// (disk_tier_workload.h) into its compressed pool, in order, forever, retrying a put the full
// queue refused. Every 32 blocks it prints "put <index> written <n>": blocks [0, n) have been
// written to RocksDB. disk_tier_test kills it with SIGKILL and checks what the store kept.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "disk_tier_workload.h"
#include "dserve/kvstore/disk_tier.h"

int main(int argc, char** argv) {
  using namespace dserve::kvstore;
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s PATH RUN\n", argv[0]);
    return 2;
  }
  const int run = std::atoi(argv[2]);
  DiskTierOptions options;
  options.path = argv[1];
  // A small queue keeps the writer thread busy: the kill lands in the middle of write-back.
  options.write_queue_bytes = 1u << 20;
  auto tier = DiskTier::open(options);
  if (!tier.is_ok()) {
    std::fprintf(stderr, "disk_tier_writer: %s\n", tier.status().to_string().c_str());
    return 1;
  }
  BlockKey key = testing_support::writer_root(run);
  for (uint64_t index = 0;; ++index) {
    key = chain_key(key, testing_support::writer_tokens(run, index));
    const std::vector<uint8_t> value = testing_support::writer_value(run, index, key);
    while (!(*tier)->put_async(key, Pool::kCompressed, value))
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    if (index % 32 == 0) {
      std::printf("put %llu written %llu\n", static_cast<unsigned long long>(index),
                  static_cast<unsigned long long>((*tier)->stats().written));
      std::fflush(stdout);
    }
  }
}
