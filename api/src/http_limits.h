#pragma once
// Bounds for the OpenAI-compatible HTTP server (cpp-httplib 0.11, Debian's build): how many
// threads serve connections, how many accepted connections may wait for one, and the listen
// backlog. httplib's own ThreadPool starts every thread at once and queues accepted
// connections without bound; its compiled-in backlog is 5.

#include <sys/types.h>

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <httplib.h>

#include "dserve/core/status.h"

namespace dserve::api {

// Runs httplib's connection tasks on up to `max_threads` threads, started when there is work
// and none is idle (an idle thread ends after `idle_exit`). At most `max_waiting` tasks wait
// for a thread: enqueue() (httplib's accept loop) then blocks, so further connections stay in
// the kernel's listen backlog, and beyond it are refused by the kernel, instead of piling up
// here as open sockets.
class BoundedTaskQueue : public httplib::TaskQueue {
 public:
  BoundedTaskQueue(size_t max_threads, size_t max_waiting,
                   std::chrono::milliseconds idle_exit = std::chrono::seconds(30));
  ~BoundedTaskQueue() override;

  void enqueue(std::function<void()> fn) override;
  void shutdown() override;  // runs what is queued, then joins every thread

  size_t threads() const;  // running now (busy or idle)

 private:
  void work();

  const size_t max_threads_;
  const size_t max_waiting_;
  const std::chrono::milliseconds idle_exit_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;   // a task arrived, or shutdown
  std::condition_variable space_cv_;  // a task left the queue
  std::deque<std::function<void()>> tasks_;
  std::vector<std::thread> threads_;  // finished ones are joined when the next one starts
  std::vector<std::thread::id> finished_;
  size_t running_ = 0;
  size_t idle_ = 0;
  bool shutdown_ = false;
};

// Socket options for httplib's listening socket: SO_REUSEADDR only (httplib's default adds
// SO_REUSEPORT, which lets another process of the same user bind the same port and take a share
// of the connections); remembers the socket so that set_backlog() can reach it after bind.
class ListenSocket {
 public:
  httplib::SocketOptions options();
  // listen() again on the bound socket with `backlog` (Linux takes the new length).
  Status set_backlog(int backlog) const;

 private:
  int fd_ = -1;
};

}  // namespace dserve::api
