// `dserve model trace`: a developer's tool. Runs our CPU forward over given token ids and writes
// every stage (embedding, the residual streams after each layer, hc_head, the final norm, the
// logits) as .npy files, named as tools/oracle/reference.py --trace names the reference's, so
// tools/oracle/compare.py can say which layer first differs when an oracle comparison fails.

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "dserve/core/files.h"
#include "dserve/model/model.h"

namespace dserve::cli {
namespace {

namespace fs = std::filesystem;

struct TraceOptions {
  std::string model_dir;
  std::string ids;  // comma-separated, or @FILE
  std::string out_dir;
  int64_t chunk = 0;  // 0: the whole prompt in one forward
};

constexpr size_t kMaxIdsFileBytes = size_t{64} << 20;

Result<std::vector<int32_t>> parse_ids(const std::string& spec) {
  std::string text = spec;
  if (!spec.empty() && spec[0] == '@') {
    DSERVE_ASSIGN_OR_RETURN(text,
                            read_bounded_file(spec.substr(1), "--ids file", kMaxIdsFileBytes));
  }
  std::vector<int32_t> ids;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find_first_of(",\n", pos);
    if (end == std::string::npos) end = text.size();
    std::string field = text.substr(pos, end - pos);
    field.erase(0, field.find_first_not_of(" \t\r"));
    field.erase(field.find_last_not_of(" \t\r") + 1);
    if (!field.empty()) {
      size_t used = 0;
      long long v = -1;
      try {
        v = std::stoll(field, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != field.size() || v < 0 || v > INT32_MAX) {
        return invalid_argument("--ids: token " + std::to_string(ids.size() + 1) + " (\"" +
                                field.substr(0, 32) + "\") is not a non-negative integer");
      }
      ids.push_back(static_cast<int32_t>(v));
    }
    pos = end + 1;
  }
  if (ids.empty()) return invalid_argument("--ids: no token ids given");
  return ids;
}

// A float32 .npy file (format 1.0): magic, header length, a Python dict padded to 64 bytes.
Status write_npy(const fs::path& path, const std::vector<int64_t>& shape,
                 const std::vector<float>& values) {
  std::string dims;
  for (const int64_t d : shape)
    dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const uint16_t len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.put(static_cast<char>(len & 0xff));
  out.put(static_cast<char>(len >> 8));
  out << header;
  out.write(reinterpret_cast<const char*>(values.data()),
            static_cast<std::streamsize>(values.size() * sizeof(float)));
  out.close();
  if (!out) return unavailable(path.string() + ": cannot write");
  return Status::ok();
}

// One stage's rows over all chunks: the first dimension grows, the others must stay the same.
struct StageRows {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

int run_trace(const TraceOptions& o) {
  auto ids = parse_ids(o.ids);
  if (!ids.is_ok()) {
    print_error(ids.status().message());
    return 2;
  }
  if (o.chunk < 0) {
    print_error("--chunk must be >= 0 (0: the whole prompt at once)");
    return 2;
  }
  int exit_code = 0;
  const std::shared_ptr<const model::Model> loaded =
      load_model_or_print(o.model_dir, "fp32", exit_code);
  if (!loaded) return exit_code;
  const model::Model& model = *loaded;

  std::map<std::string, StageRows> stages;
  std::vector<std::string> order;
  const auto observe = [&](const model::ForwardStage& s) {
    auto [it, fresh] = stages.try_emplace(s.name);
    if (fresh) {
      order.push_back(s.name);
      it->second.shape = s.shape;
      it->second.shape[0] = 0;
    }
    it->second.shape[0] += s.shape[0];
    it->second.values.insert(it->second.values.end(), s.values.begin(), s.values.end());
  };
  StageRows logits;
  model::RequestState state = model.new_state();
  const size_t chunk = o.chunk == 0 ? ids->size() : static_cast<size_t>(o.chunk);
  for (size_t begin = 0; begin < ids->size(); begin += chunk) {
    const size_t n = std::min(chunk, ids->size() - begin);
    auto out = model.forward(std::span(*ids).subspan(begin, n), state, model::LogitsFor::kAllTokens,
                             observe);
    if (!out.is_ok()) {
      print_error(out.status().to_string());
      return 2;
    }
    logits.shape = {static_cast<int64_t>(begin + n), out->cols()};
    logits.values.insert(logits.values.end(), out->data(), out->data() + out->numel());
  }
  stages["logits"] = std::move(logits);
  order.push_back("logits");

  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  for (const std::string& name : order) {
    const StageRows& s = stages[name];
    if (Status st = write_npy(fs::path(o.out_dir) / (name + ".npy"), s.shape, s.values);
        !st.is_ok()) {
      print_error(st.to_string());
      return 1;
    }
  }
  std::fprintf(stderr, "dserve: traced %zu ids in chunks of %zu: %zu stages in %s\n", ids->size(),
               chunk, order.size(), o.out_dir.c_str());
  return 0;
}

}  // namespace

Command add_model_trace_command(CLI::App& model_app) {
  auto opts = std::make_shared<TraceOptions>();
  CLI::App* cmd = model_app.add_subcommand(
      "trace", "developer tool: write every stage of the CPU forward over token ids as .npy");
  cmd->add_option("--model", opts->model_dir, "checkpoint directory")->required();
  cmd->add_option("--ids", opts->ids, "comma-separated token ids (BOS first), or @FILE")
      ->required();
  cmd->add_option("--out", opts->out_dir, "output directory for the .npy files")->required();
  cmd->add_option("--chunk", opts->chunk,
                  "run the ids in chunks of this many (0: all at once), as prefill does")
      ->capture_default_str();
  return [opts] { return run_trace(*opts); };
}

}  // namespace dserve::cli
