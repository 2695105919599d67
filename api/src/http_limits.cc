#include "http_limits.h"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

#include "dserve/core/check.h"

namespace dserve::api {

BoundedTaskQueue::BoundedTaskQueue(size_t max_threads, size_t max_waiting,
                                   std::chrono::milliseconds idle_exit)
    : max_threads_(std::max<size_t>(1, max_threads)),
      max_waiting_(std::max<size_t>(1, max_waiting)),
      idle_exit_(idle_exit) {}

BoundedTaskQueue::~BoundedTaskQueue() {
  BoundedTaskQueue::shutdown();  // this class's own: no virtual dispatch in a destructor
}

void BoundedTaskQueue::enqueue(std::function<void()> fn) {
  std::unique_lock lock(mu_);
  space_cv_.wait(lock, [&] { return shutdown_ || tasks_.size() < max_waiting_; });
  DSERVE_CHECK_MSG(!shutdown_, "a connection task enqueued after shutdown");
  tasks_.push_back(std::move(fn));
  if (idle_ > 0 || running_ >= max_threads_) {
    work_cv_.notify_one();
    return;
  }
  // Join the threads that ended since the last start (they have left work()).
  for (const std::thread::id id : finished_) {
    auto it = std::find_if(threads_.begin(), threads_.end(),
                           [id](const std::thread& t) { return t.get_id() == id; });
    if (it != threads_.end()) {
      it->join();
      threads_.erase(it);
    }
  }
  finished_.clear();
  ++running_;
  threads_.emplace_back([this] { work(); });
}

void BoundedTaskQueue::work() {
  std::unique_lock lock(mu_);
  for (;;) {
    ++idle_;
    const bool woke =
        work_cv_.wait_for(lock, idle_exit_, [&] { return shutdown_ || !tasks_.empty(); });
    --idle_;
    if (tasks_.empty() && (shutdown_ || !woke)) break;
    std::function<void()> fn = std::move(tasks_.front());
    tasks_.pop_front();
    space_cv_.notify_one();
    lock.unlock();
    fn();
    lock.lock();
  }
  --running_;
  finished_.push_back(std::this_thread::get_id());
}

void BoundedTaskQueue::shutdown() {
  std::vector<std::thread> threads;
  {
    std::lock_guard lock(mu_);
    shutdown_ = true;
    threads.swap(threads_);
  }
  work_cv_.notify_all();
  space_cv_.notify_all();
  for (auto& t : threads)
    t.join();
}

size_t BoundedTaskQueue::threads() const {
  std::lock_guard lock(mu_);
  return running_;
}

httplib::SocketOptions ListenSocket::options() {
  return [this](int sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    fd_ = sock;
  };
}

Status ListenSocket::set_backlog(int backlog) const {
  if (fd_ < 0) return internal_error("the HTTP server's socket was never created");
  if (::listen(fd_, backlog) != 0) {
    return unavailable("listen(backlog " + std::to_string(backlog) + "): " + std::strerror(errno));
  }
  return Status::ok();
}

}  // namespace dserve::api
