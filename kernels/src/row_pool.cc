#include "row_pool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace dserve::kernels::cpu::detail {
namespace {

thread_local bool t_inside_pool = false;

// How long a thread polls for its next part (a worker) or for the others to finish (the
// caller) before it sleeps. A step runs hundreds of small products back to back; sleeping and
// waking between each cost ~10% of a decode step in futex calls and context switches, while a
// thread idle for longer than this sleeps as before.
constexpr auto kSpin = std::chrono::microseconds(50);

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls `ready` for up to kSpin; true when it became true.
template <typename Ready>
bool spin_until(Ready ready) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return false;
  }
}

// The cores this process may run on (its affinity mask: `taskset -c 0` gives 1), not the
// machine's: more threads than cores only adds switching.
unsigned usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return static_cast<unsigned>(n);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

class Pool {
 public:
  Pool() {
    const unsigned n = usable_cores();
    for (unsigned i = 1; i < n; ++i)
      workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_)
      t.join();
  }
  size_t threads() const { return workers_.size() + 1; }

  void run(std::vector<std::function<void()>>& tasks) {
    struct Batch {
      std::mutex mu;
      std::condition_variable done;
      std::atomic<size_t> left;
    } batch;
    batch.left = tasks.size();
    // The count drops under the lock, so that a caller who saw it reach 0 and then takes the
    // lock knows no finisher touches `batch` (on its stack) any more.
    const auto finish = [&batch] {
      std::lock_guard lock(batch.mu);
      if (batch.left.fetch_sub(1, std::memory_order_acq_rel) == 1) batch.done.notify_one();
    };
    {
      std::lock_guard lock(mu_);
      for (size_t i = 1; i < tasks.size(); ++i) {
        queue_.push_back([&tasks, i, &finish] {
          tasks[i]();
          finish();
        });
      }
      queued_.store(queue_.size(), std::memory_order_release);
    }
    cv_.notify_all();
    t_inside_pool = true;
    tasks[0]();
    t_inside_pool = false;
    finish();
    spin_until([&batch] { return batch.left.load(std::memory_order_acquire) == 0; });
    std::unique_lock lock(batch.mu);
    batch.done.wait(lock, [&batch] { return batch.left.load(std::memory_order_acquire) == 0; });
  }

 private:
  void work() {
    t_inside_pool = true;
    for (;;) {
      spin_until([this] { return queued_.load(std::memory_order_acquire) > 0; });
      std::function<void()> task;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (stop_ && queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
        queued_.store(queue_.size(), std::memory_order_release);
      }
      task();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::atomic<size_t> queued_{0};  // queue_.size(), readable without the lock
  std::vector<std::thread> workers_;
  bool stop_ = false;
};

Pool& pool() {
  static Pool p;
  return p;
}

}  // namespace

void for_each_row_part(int64_t rows, int64_t min_rows,
                       const std::function<void(int64_t, int64_t)>& body) {
  const int64_t parts = t_inside_pool ? 1
                                      : std::min<int64_t>(static_cast<int64_t>(pool().threads()),
                                                          rows / std::max<int64_t>(1, min_rows));
  if (parts < 2) {
    body(0, rows);
    return;
  }
  std::vector<std::function<void()>> tasks;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t begin = rows * p / parts, end = rows * (p + 1) / parts;
    tasks.emplace_back([&body, begin, end] { body(begin, end); });
  }
  pool().run(tasks);
}

}  // namespace dserve::kernels::cpu::detail
