#pragma once
// The two stages of manifest validation: reading each section into the typed Manifest
// (manifest_parse.cc), then the checks across sections that resolve every process's node,
// ports and devices (manifest_resolve.cc).

#include <yaml-cpp/yaml.h>

#include "dserve/cluster/manifest.h"
#include "yaml_fields.h"

namespace dserve::cluster::internal {

// Where fields that cross-section checks refer to were found, and what was given at all.
struct SectionInfo {
  bool mode_known = false;
  bool nodes_ok = false;  // nodes read without problems that make placement checks noise
  Location kv_host_mib_at;
  Location pools_at;
  bool slurm = false;  // launcher: slurm (read before the nodes, the gateway and the pools)
};

// Reads every section of `root` into `out`; reports what is wrong inside each section.
void read_sections(const YAML::Node& root, ProblemSink& sink, Manifest& out, SectionInfo& info);

// manifest_launch.cc: the top-level `launcher`, the `slurm` and `supervision` sections, and
// for launcher slurm the one planning node every process is resolved on (kSlurmPlanningNode).
void read_launcher(const YAML::Node& node, Location at, ProblemSink& sink, Manifest& out);
void read_slurm(const YAML::Node& node, Location at, ProblemSink& sink, SlurmSpec& slurm);
void read_supervision(const YAML::Node& node, Location at, ProblemSink& sink,
                      SupervisionSpec& supervision);
void plan_on_slurm_node(const YAML::Node& root, ProblemSink& sink, Manifest& out,
                        SectionInfo& info);

// Checks across sections and fills out.processes: unique node names and addresses, known
// nodes in placements, devices per node, ports (explicit or from base_port), host memory.
void resolve_processes(Manifest& out, const SectionInfo& info, ProblemSink& sink);

// An IPv4 address or an RFC 1123 host name.
bool is_valid_address(std::string_view address);

}  // namespace dserve::cluster::internal
