#pragma once
// The Slurm side of `dserve up` under `launcher: slurm`: the heterogeneous job (one component
// per role: the gateway's node, then one node per replica of each pool), each component
// running one node agent per node as a job step, and what the scheduler says of it.
//
// Every Slurm command runs under `timeout` (a client whose munged is gone retries for
// minutes), with SLURM_CONF and the rest of the environment passed through.

#include <chrono>
#include <string>
#include <vector>

#include "dserve/cluster/manifest.h"
#include "dserve/core/status.h"

namespace dserve::cluster {

// One component of the job: the role it hosts and the nodes Slurm gave it.
struct SlurmComponent {
  ProcessRole role = ProcessRole::kGateway;
  std::string id;                  // "<job>+<k>" as squeue prints it
  std::string state;               // PENDING, RUNNING, ...
  std::string reason;              // why it is pending
  std::vector<std::string> nodes;  // expanded node names, in order
};

// A step of the job as squeue prints it.
struct SlurmStep {
  std::string id;  // "<job>.<step>"
  std::string name;
  std::string nodes;
};

// The roles of the job's components, in order: the gateway, then each pool of the manifest.
std::vector<ProcessRole> slurm_component_roles(const Manifest& m);

// The batch script: one `srun --het-group=k` step per component running `program agent` on
// each of its nodes; when one ends (the cluster ended, a node was lost), the job ends.
std::string slurm_batch_script(const Manifest& m, const std::string& state_dir,
                               const std::string& program);

// Submits the job (sbatch --parsable); its id. A refusal is kInvalidArgument with sbatch's
// words and the manifest line of the setting they concern (partition, account, time limit,
// constraint, a pool's gres).
Result<std::string> submit_slurm_job(const Manifest& m, const std::string& state_dir,
                                     const std::string& program);

// The job's components; an empty list once Slurm no longer knows the job.
Result<std::vector<SlurmComponent>> slurm_job_components(const Manifest& m, const std::string& job);
// The job's running steps.
Result<std::vector<SlurmStep>> slurm_job_steps(const std::string& job);
// The address Slurm reaches `node` at (its NodeAddr).
Result<std::string> slurm_node_address(const std::string& node);
// Whether squeue still lists the job (pending, running or completing); an error when Slurm
// does not answer.
Result<bool> slurm_job_listed(const std::string& job);
// scancel; then waits up to `timeout` until squeue no longer lists the job.
Status cancel_slurm_job(const std::string& job, std::chrono::milliseconds timeout);

}  // namespace dserve::cluster
