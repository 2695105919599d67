#include "dserve/cluster/manifest.h"

#include "dserve/core/files.h"

#include <fstream>
#include <sstream>

#include "manifest_internal.h"

namespace dserve::cluster {

std::string_view serving_mode_name(ServingMode mode) {
  return mode == ServingMode::kColocated ? "colocated" : "disaggregated";
}

std::string_view process_role_name(ProcessRole role) {
  switch (role) {
    case ProcessRole::kGateway:
      return "gateway";
    case ProcessRole::kPrefill:
      return "prefill";
    case ProcessRole::kDecode:
      return "decode";
    case ProcessRole::kColocated:
      return "colocated";
    case ProcessRole::kNodeAgent:
      return "agent";
  }
  return "?";
}

std::string_view launcher_name(Launcher launcher) {
  return launcher == Launcher::kSlurm ? "slurm" : "nodes";
}

std::string ManifestProblem::to_string() const {
  std::string out = file;
  if (at.line > 0) out += ":" + std::to_string(at.line) + ":" + std::to_string(at.column);
  out += ": ";
  if (!field.empty()) out += field + ": ";
  return out + "found " + found + "; expected " + expected;
}

ManifestCheck check_manifest(std::string_view text, std::string_view source_name) {
  internal::ProblemSink sink{std::string(source_name)};
  Manifest manifest;
  manifest.source = std::string(source_name);
  // yaml-cpp reports through exceptions; they stop here, at the edge, as problems.
  try {
    const std::vector<YAML::Node> documents = YAML::LoadAll(std::string(text));
    const YAML::Node root = documents.empty() ? YAML::Node() : documents.front();
    if (documents.size() > 1) {
      // A second document would be ignored: say so rather than run half of what was written.
      const YAML::Mark at = documents[1].Mark();
      sink.add({at.line + 1, at.column + 1}, "",
               std::to_string(documents.size()) + " YAML documents (separated by ---)",
               "one manifest document per file");
    }
    if (!root.IsDefined() || root.IsNull()) {
      sink.add({}, "", "an empty file",
               "a manifest mapping (version, mode, model, nodes, gateway, pools, ...)");
    } else {
      internal::SectionInfo info;
      internal::read_sections(root, sink, manifest, info);
      internal::resolve_processes(manifest, info, sink);
    }
  } catch (const YAML::ParserException& e) {
    sink.add({e.mark.line + 1, e.mark.column + 1}, "", "a YAML syntax error: " + e.msg,
             "well-formed YAML");
  } catch (const YAML::Exception& e) {
    sink.add({}, "", "YAML the reader cannot walk: " + e.msg, "well-formed YAML");
  }
  ManifestCheck check;
  check.problems = sink.take();
  if (check.problems.empty()) check.manifest = std::move(manifest);
  return check;
}

Result<Manifest> parse_manifest(std::string_view text, std::string_view source_name) {
  ManifestCheck check = check_manifest(text, source_name);
  if (check.manifest) return std::move(*check.manifest);
  std::string message = std::string(source_name) + ": " + std::to_string(check.problems.size()) +
                        (check.problems.size() == 1 ? " problem:" : " problems:");
  for (const ManifestProblem& p : check.problems)
    message += "\n" + p.to_string();
  return invalid_argument(std::move(message));
}

Result<Manifest> load_manifest(const std::string& path) {
  DSERVE_ASSIGN_OR_RETURN(const std::string text,
                          read_bounded_file(path, "manifest", kMaxManifestBytes));
  return parse_manifest(text, path);
}

const Process* find_process(const Manifest& manifest, std::string_view name) {
  for (const Process& p : manifest.processes) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

}  // namespace dserve::cluster
