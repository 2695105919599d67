// MixedStepEngine (mixed_step_engine.h): sessions post steps; one poster at a time leads,
// taking the posted rows into one step of the engine (flat combining), and hands every poster
// its share of the logits.

#include "dserve/model/mixed_step_engine.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "dserve/core/check.h"

namespace dserve::model {

// A posted step: one session's rows, run in one or several steps of the engine.
struct MixedStepEngine::Post {
  Session* session = nullptr;
  bool decode = false;
  std::span<const StepRows> rows;           // the engine's own requests
  size_t next_row = 0;                      // the first row not wholly run
  int64_t next_token = 0;                   // tokens of rows[next_row] already run
  std::vector<std::vector<Tensor>> pieces;  // per row: the logits of its parts that count
  bool done = false;
  Status status;
};

// The tokens [begin, begin + count) of one posted row, in one step.
struct MixedStepEngine::Part {
  Post* post = nullptr;
  size_t row = 0;
  int64_t begin = 0;
  int64_t count = 0;
  Status status;  // of the step that ran it
  Tensor logits;
};

class MixedStepEngine::SharedRequest final : public EngineRequest {
 public:
  SharedRequest(MixedStepEngine& owner, const Session* session, RequestHandle inner)
      : owner_(owner), session_(session), inner_(std::move(inner)) {}
  // The engine's request goes between steps: a backend may return its slot to a pool.
  ~SharedRequest() override {
    if (inner_) {
      owner_.exclusive([&] {
        inner_.reset();
        return 0;
      });
    }
  }
  int64_t position() const override { return inner_->position(); }
  const Session* session() const { return session_; }
  EngineRequest* inner() const { return inner_.get(); }
  RequestHandle take() { return std::move(inner_); }

 private:
  MixedStepEngine& owner_;
  const Session* session_;
  RequestHandle inner_;
};

class MixedStepEngine::Session final : public Engine {
 public:
  Session(MixedStepEngine& owner, StepPriority priority) : owner_(owner), priority_(priority) {}
  ~Session() override {
    std::lock_guard lock(owner_.mu_);
    std::erase(owner_.sessions_, this);
  }

  StepPriority priority() const { return priority_; }
  bool in_last_step = false;

  const ModelConfig& config() const override { return owner_.engine_->config(); }
  const Device& device() const override { return owner_.engine_->device(); }
  std::string describe() const override { return owner_.engine_->describe(); }
  const KvPagePools& page_pools() const override { return owner_.engine_->page_pools(); }

  Result<RequestHandle> new_request() override {
    return wrap(owner_.exclusive([&] { return owner_.engine_->new_request(); }));
  }
  Result<RequestHandle> import_state(RequestState state) override {
    return wrap(owner_.exclusive([&] { return owner_.engine_->import_state(std::move(state)); }));
  }

  Result<std::vector<Tensor>> step(std::span<const StepRows> rows) override {
    DSERVE_ASSIGN_OR_RETURN(const std::vector<StepRows> inner, engine_rows(rows, "step"));
    return owner_.post_and_wait(*this, inner);
  }

  Result<RequestState> export_state(const EngineRequest& request) const override {
    const SharedRequest* r = mine(&request);
    if (r == nullptr || r->inner() == nullptr)
      return invalid_argument("export_state: not a live request of this session");
    return owner_.exclusive([&] { return owner_.engine_->export_state(*r->inner()); });
  }
  Result<RequestState> release_state(RequestHandle request) override {
    SharedRequest* r = mine(request.get());
    if (r == nullptr || r->inner() == nullptr)
      return invalid_argument("release_state: not a live request of this session");
    RequestHandle inner = r->take();
    return owner_.exclusive([&] { return owner_.engine_->release_state(std::move(inner)); });
  }
  const RequestState* host_state(const EngineRequest& request) const override {
    const SharedRequest* r = mine(&request);
    if (r == nullptr || r->inner() == nullptr) return nullptr;
    return owner_.exclusive([&] { return owner_.engine_->host_state(*r->inner()); });
  }
  Status rewind(EngineRequest& request, int64_t position) override {
    SharedRequest* r = mine(&request);
    if (r == nullptr || r->inner() == nullptr)
      return invalid_argument("rewind: not a live request of this session");
    return owner_.exclusive([&] { return owner_.engine_->rewind(*r->inner(), position); });
  }
  bool can_draft() const override { return owner_.engine_->can_draft(); }
  Result<std::vector<std::vector<int32_t>>> draft(std::span<const DraftRows> rows,
                                                  int64_t sampleable_ids) override {
    DSERVE_ASSIGN_OR_RETURN(const std::vector<DraftRows> inner, engine_rows(rows, "draft"));
    return owner_.exclusive([&] { return owner_.engine_->draft(inner, sampleable_ids); });
  }

 private:
  // The rows (StepRows, DraftRows) with each request the engine's own; INVALID_ARGUMENT naming
  // the first row whose request is not a live request of this session.
  template <typename Rows>
  Result<std::vector<Rows>> engine_rows(std::span<const Rows> rows, const char* call) {
    std::vector<Rows> inner(rows.begin(), rows.end());
    for (size_t i = 0; i < inner.size(); ++i) {
      const SharedRequest* r = mine(inner[i].request);
      if (r == nullptr || r->inner() == nullptr) {
        return invalid_argument(std::string(call) + ": row " + std::to_string(i) +
                                "'s request is not a live request of this session");
      }
      inner[i].request = r->inner();
    }
    return inner;
  }
  const SharedRequest* mine(const EngineRequest* request) const {
    const auto* r = dynamic_cast<const SharedRequest*>(request);
    return r != nullptr && r->session() == this ? r : nullptr;
  }
  SharedRequest* mine(EngineRequest* request) {
    auto* r = dynamic_cast<SharedRequest*>(request);
    return r != nullptr && r->session() == this ? r : nullptr;
  }
  Result<RequestHandle> wrap(Result<RequestHandle> made) {
    if (!made.is_ok()) return made.status();
    return RequestHandle(std::make_unique<SharedRequest>(owner_, this, std::move(made).value()));
  }

  MixedStepEngine& owner_;
  StepPriority priority_;
};

MixedStepEngine::MixedStepEngine(std::unique_ptr<Engine> engine, const MixedStepOptions& options)
    : engine_(std::move(engine)), options_(options) {
  DSERVE_CHECK_MSG(engine_ != nullptr, "MixedStepEngine: no engine");
  DSERVE_CHECK_MSG(options_.max_step_tokens >= 1, "MixedStepEngine: max_step_tokens < 1");
}

MixedStepEngine::~MixedStepEngine() {
  std::lock_guard lock(mu_);
  DSERVE_CHECK_MSG(sessions_.empty(), "MixedStepEngine destroyed before its sessions");
}

std::unique_ptr<Engine> MixedStepEngine::session(StepPriority priority) {
  auto s = std::make_unique<Session>(*this, priority);
  std::lock_guard lock(mu_);
  sessions_.push_back(s.get());
  return s;
}

MixedStepStats MixedStepEngine::stats() const {
  std::lock_guard lock(mu_);
  MixedStepStats s = stats_;
  s.waiting_posts = static_cast<int64_t>(pending_.size());
  return s;
}

template <typename Fn>
auto MixedStepEngine::exclusive(Fn&& fn) -> decltype(fn()) {
  std::unique_lock lock(mu_);
  ++exclusive_waiting_;
  changed_.notify_all();  // a leader waiting for posts goes ahead
  changed_.wait(lock, [&] { return !busy_; });
  --exclusive_waiting_;
  busy_ = true;
  lock.unlock();
  struct Release {
    MixedStepEngine& self;
    ~Release() {
      std::lock_guard relock(self.mu_);
      self.busy_ = false;
      self.changed_.notify_all();
    }
  } release{*this};
  return fn();
}

Result<std::vector<Tensor>> MixedStepEngine::post_and_wait(Session& session,
                                                           std::span<const StepRows> rows) {
  if (rows.empty()) return std::vector<Tensor>{};
  Post post;
  post.session = &session;
  post.decode = session.priority() == StepPriority::kDecode;
  post.rows = rows;
  post.pieces.resize(rows.size());
  std::unique_lock lock(mu_);
  pending_.push_back(&post);
  changed_.notify_all();
  while (!post.done) {
    if (busy_ || exclusive_waiting_ > 0) {
      changed_.wait(lock);
      continue;
    }
    busy_ = true;
    // Lead: wait a little for the sessions of the last step that have not posted yet.
    const auto expected_posted = [&] {
      if (exclusive_waiting_ > 0) return true;
      for (const Session* s : sessions_) {
        if (!s->in_last_step) continue;
        const bool posted = std::any_of(pending_.begin(), pending_.end(),
                                        [&](const Post* p) { return p->session == s; });
        if (!posted) return false;
      }
      return true;
    };
    changed_.wait_for(lock, options_.mix_wait, expected_posted);
    std::vector<Part> parts = plan_step();
    lock.unlock();
    run_step(parts);
    lock.lock();
    settle(parts);
    busy_ = false;
    changed_.notify_all();
  }
  if (!post.status.is_ok()) return post.status;
  std::vector<Tensor> out;
  out.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<Tensor>& pieces = post.pieces[i];
    if (pieces.size() == 1) {
      out.push_back(std::move(pieces.front()));
      continue;
    }
    // kAllTokens over several steps: the pieces' rows one after another.
    int64_t total = 0;
    for (const Tensor& t : pieces)
      total += t.rows();
    const int64_t vocab = pieces.front().cols();
    std::vector<float> data;
    data.reserve(static_cast<size_t>(total * vocab));
    for (const Tensor& t : pieces)
      data.insert(data.end(), t.data(), t.data() + t.numel());
    out.emplace_back(std::vector<int64_t>{total, vocab}, std::move(data));
  }
  return out;
}

std::vector<MixedStepEngine::Part> MixedStepEngine::plan_step() {
  std::vector<Part> parts;
  int64_t budget = options_.max_step_tokens;
  const auto rest_of = [](const Post& p, size_t row) {
    return row == p.next_row ? p.next_token : int64_t{0};
  };
  for (Post* p : pending_) {
    if (!p->decode) continue;
    for (size_t row = p->next_row; row < p->rows.size(); ++row) {
      const int64_t begin = rest_of(*p, row);
      const auto count = static_cast<int64_t>(p->rows[row].tokens.size()) - begin;
      parts.push_back({p, row, begin, count, {}, {}});
      budget -= count;
    }
  }
  // Prefill fills the rest; at least one row goes in, so that decode cannot starve it.
  bool any_prefill = false;
  for (Post* p : pending_) {
    if (p->decode) continue;
    for (size_t row = p->next_row; row < p->rows.size(); ++row) {
      if (budget <= 0 && any_prefill) break;
      const int64_t begin = rest_of(*p, row);
      const auto left = static_cast<int64_t>(p->rows[row].tokens.size()) - begin;
      const int64_t count = std::min(left, std::max<int64_t>(budget, 1));
      if (count < left) ++stats_.split_chunks;
      parts.push_back({p, row, begin, count, {}, {}});
      budget -= count;
      any_prefill = true;
    }
    if (budget <= 0) break;
  }
  return parts;
}

void MixedStepEngine::run_step(std::vector<Part>& parts) {
  const auto rows_of = [](const Part& part) {
    const StepRows& whole = part.post->rows[part.row];
    // Only whole rows are rewindable: decode rows are never cut.
    const bool all = part.begin == 0 && part.count == static_cast<int64_t>(whole.tokens.size());
    return StepRows{
        whole.request,
        whole.tokens.subspan(static_cast<size_t>(part.begin), static_cast<size_t>(part.count)),
        whole.which, whole.rewindable && all};
  };
  std::vector<StepRows> rows;
  rows.reserve(parts.size());
  for (const Part& part : parts)
    rows.push_back(rows_of(part));
  auto logits = engine_->step(rows);
  if (logits.is_ok()) {
    for (size_t i = 0; i < parts.size(); ++i)
      parts[i].logits = std::move((*logits)[i]);
    return;
  }
  std::vector<Post*> posts;
  for (const Part& part : parts) {
    if (std::find(posts.begin(), posts.end(), part.post) == posts.end()) posts.push_back(part.post);
  }
  if (logits.status().code() == StatusCode::kInternal || posts.size() == 1) {
    for (Part& part : parts)
      part.status = logits.status();
    return;
  }
  // The step left every state as it was: each poster's rows again, alone, so that only the
  // poster at fault sees the error.
  {
    std::lock_guard lock(mu_);
    ++stats_.rerun_steps;
  }
  Status fault;  // a device fault on the way fails the posters after it too
  for (Post* post : posts) {
    std::vector<size_t> mine;
    std::vector<StepRows> own;
    for (size_t i = 0; i < parts.size(); ++i) {
      if (parts[i].post != post) continue;
      mine.push_back(i);
      own.push_back(rows_of(parts[i]));
    }
    auto alone = fault.is_ok() ? engine_->step(own) : Result<std::vector<Tensor>>(fault);
    if (!alone.is_ok() && alone.status().code() == StatusCode::kInternal) fault = alone.status();
    for (size_t k = 0; k < mine.size(); ++k) {
      if (alone.is_ok()) {
        parts[mine[k]].logits = std::move((*alone)[k]);
      } else {
        parts[mine[k]].status = alone.status();
      }
    }
  }
}

void MixedStepEngine::settle(std::vector<Part>& parts) {
  int64_t decode_rows = 0, prefill_rows = 0;
  for (Session* s : sessions_)
    s->in_last_step = false;
  for (Part& part : parts) {
    Post& p = *part.post;
    (p.decode ? decode_rows : prefill_rows) += part.count;
    p.session->in_last_step = true;
    if (p.done) continue;  // an earlier part of the post failed
    if (!part.status.is_ok()) {
      finish(p, part.status);
      continue;
    }
    const StepRows& row = p.rows[part.row];
    const bool last_piece = part.begin + part.count == static_cast<int64_t>(row.tokens.size());
    if (row.which == LogitsFor::kAllTokens || last_piece)
      p.pieces[part.row].push_back(std::move(part.logits));
    if (last_piece) {
      p.next_row = part.row + 1;
      p.next_token = 0;
    } else {
      p.next_token = part.begin + part.count;
    }
    if (p.next_row == p.rows.size()) finish(p, Status());
  }
  std::erase_if(pending_, [](const Post* p) { return p->done; });
  ++stats_.steps;
  if (decode_rows > 0 && prefill_rows > 0) ++stats_.mixed_steps;
  stats_.largest_step = std::max(stats_.largest_step, decode_rows + prefill_rows);
  if (options_.on_step) options_.on_step(decode_rows, prefill_rows);
}

void MixedStepEngine::finish(Post& post, Status status) {
  post.done = true;
  post.status = std::move(status);
}

}  // namespace dserve::model
