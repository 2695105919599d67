// dserve: the command-line entry point. Subcommands live in their own files (commands.h).

#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "commands.h"

// An exception that no command caught ends dserve with its message and exit code 1 (rather than
// std::terminate's abort).
int main(int argc, char** argv) try {
  CLI::App app{"dserve: DeepSeek-V4 serving"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "dserve 0.1.0");

  CLI::App* model = app.add_subcommand("model", "create and inspect model checkpoints");
  model->require_subcommand(1);
  const dserve::cli::Command model_init = dserve::cli::add_model_init_command(*model);
  const dserve::cli::Command model_verify = dserve::cli::add_model_verify_command(*model);
  const dserve::cli::Command model_trace = dserve::cli::add_model_trace_command(*model);
  const dserve::cli::Command generate = dserve::cli::add_generate_command(app);
  const dserve::cli::Command serve = dserve::cli::add_serve_command(app);
  const dserve::cli::Command submit = dserve::cli::add_submit_command(app);
  const dserve::cli::ClusterCommands cluster = dserve::cli::add_cluster_commands(app);
  const dserve::cli::Command bundle = dserve::cli::add_bundle_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (model->got_subcommand("init")) return model_init();
  if (model->got_subcommand("verify")) return model_verify();
  if (model->got_subcommand("trace")) return model_trace();
  if (app.got_subcommand("generate")) return generate();
  if (app.got_subcommand("serve")) return serve();
  if (app.got_subcommand("submit")) return submit();
  if (app.got_subcommand("up")) return cluster.up();
  if (app.got_subcommand("status")) return cluster.status();
  if (app.got_subcommand("scale")) return cluster.scale();
  if (app.got_subcommand("down")) return cluster.down();
  if (app.got_subcommand("agent")) return cluster.agent();
  if (app.got_subcommand("bundle")) return bundle();
  return 2;
} catch (const std::exception& e) {
  std::fprintf(stderr, "dserve: %s\n", e.what());
  return 1;
} catch (...) {
  std::fprintf(stderr, "dserve: an unknown exception\n");
  return 1;
}
