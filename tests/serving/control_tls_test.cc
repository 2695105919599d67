// Mutual TLS on the control plane (--control-tls-cert/-key/-ca on every role): a cluster whose
// processes hold certificates of one CA serves requests token-exact; a process without a
// certificate, or with one of another CA, cannot reach a worker (so cannot send it a single
// message), and a worker without one is not admitted by AddWorker. A process refuses to start
// on a key that does not match its certificate, or a certificate its CA did not sign.
// Certificates are made by the `openssl` command for the test.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "dserve/actors/actor_runtime.h"
#include "dserve/actors/prefill_interface.h"
#include "dserve/api/serving_client.h"
#include "serve_cluster.h"

namespace dserve {
namespace {

using testing_support::ClusterOptions;
using testing_support::random_prompt;
using testing_support::reference_tokens;
using testing_support::ServeCluster;
using testing_support::ServeProcess;

struct Pki {
  std::string ca, cert, key;                    // the cluster's
  std::string other_ca, other_cert, other_key;  // another CA's, and a node of it
};

// Two CAs, each with one node certificate good for both ends of a connection.
bool make_pki(const std::string& dir, Pki& pki) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/node.ext") << "extendedKeyUsage=serverAuth,clientAuth\n";
  const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ";
  std::string cmd = "cd " + dir;
  for (const std::string name : {"cluster", "other"}) {
    cmd += " && openssl req -x509" + ec + "-keyout " + name + "-ca.key -out " + name +
           "-ca.pem -days 1 -subj '/CN=" + name + " CA' && openssl req" + ec + "-keyout " + name +
           "-node.key -out " + name + "-node.csr -subj '/CN=" + name +
           " node' && openssl x509 -req -in " + name + "-node.csr -CA " + name + "-ca.pem -CAkey " +
           name + "-ca.key -CAcreateserial -days 1 -extfile node.ext -out " + name + "-node.pem";
  }
  pki = {dir + "/cluster-ca.pem", dir + "/cluster-node.pem", dir + "/cluster-node.key",
         dir + "/other-ca.pem",   dir + "/other-node.pem",   dir + "/other-node.key"};
  return std::system(("(" + cmd + ") > " + dir + "/openssl.log 2>&1").c_str()) == 0;
}

std::vector<std::string> tls_args(const std::string& cert, const std::string& key,
                                  const std::string& ca) {
  return {"--control-tls-cert", cert, "--control-tls-key", key, "--control-tls-ca", ca};
}

// Asks the prefill worker at `worker` for its health from a runtime of this process with `tls`.
Status probe(const ServeProcess& worker, const actors::ControlTls& tls) {
  actors::RuntimeConfig cfg;
  cfg.tls = tls;
  cfg.connect_timeout = std::chrono::milliseconds(3000);
  auto rt = actors::ActorRuntime::start(cfg);
  if (!rt.is_ok()) return rt.status();
  auto handle = (*rt)->connect<actors::PrefillActor>(worker.host(), worker.port());
  if (!handle.is_ok()) return handle.status();
  auto report = (*rt)->call<actors::HealthReport>(
      *handle, actors::HealthProbe{actors::Role::kGateway, (*rt)->epoch(), 0});
  return report.is_ok() ? Status::ok() : report.status();
}

TEST(ControlTls, OnlyHoldersOfAClusterCertificateReachTheWorkers) {
  // OpenSSL writes a refused handshake's alert with write(): a closed peer raises SIGPIPE.
  ::signal(SIGPIPE, SIG_IGN);
  Pki pki;
  ASSERT_TRUE(make_pki(::testing::TempDir() + "/dserve-control-tls", pki));
  const auto args = tls_args(pki.cert, pki.key, pki.ca);
  ClusterOptions o;
  o.prefill = 1;
  o.decode = 1;
  o.prefill_args = args;
  o.decode_args = args;
  o.gateway_args = args;
  ServeCluster cluster(o);
  ASSERT_TRUE(cluster.ready()) << cluster.logs();

  // Served, token-exact, with every control message over mutual TLS.
  auto client = api::ServingClient::connect(cluster.grpc_address(), std::chrono::seconds(10));
  ASSERT_TRUE(client.is_ok()) << client.status().to_string();
  const auto prompt = random_prompt(300, 6100);
  auto done =
      (*client)->generate(testing_support::request_for(prompt, 6), {}, std::chrono::seconds(60));
  ASSERT_TRUE(done.is_ok()) << done.status().to_string() << "\n" << cluster.logs();
  EXPECT_EQ(done->tokens, reference_tokens(prompt, 6));

  // A process of the cluster's CA reaches the worker; without a certificate, or with another
  // CA's, it cannot even connect (before: any process could, and send it any message).
  const ServeProcess& worker = *cluster.prefill[0];
  EXPECT_TRUE(probe(worker, {pki.cert, pki.key, pki.ca}).is_ok());
  const Status plain = probe(worker, {});
  EXPECT_FALSE(plain.is_ok());
  EXPECT_EQ(plain.code(), StatusCode::kUnavailable) << plain.to_string();
  const Status rogue = probe(worker, {pki.other_cert, pki.other_key, pki.other_ca});
  EXPECT_FALSE(rogue.is_ok());
  // A rogue that trusts the cluster's CA still presents a certificate the workers refuse.
  const Status rogue_trusting = probe(worker, {pki.other_cert, pki.other_key, pki.ca});
  EXPECT_FALSE(rogue_trusting.is_ok());

  // A worker without a cluster certificate is not admitted: the gateway cannot reach it.
  ServeProcess outsider("prefill", "127.0.0.1", 0, {});
  ASSERT_TRUE(outsider.ready()) << outsider.log();
  const Status added =
      (*client)->add_worker("prefill", outsider.address(), std::chrono::milliseconds(3000));
  EXPECT_FALSE(added.is_ok()) << "a worker without a cluster certificate was admitted";
  // The cluster serves on.
  done = (*client)->generate(testing_support::request_for(prompt, 6), {}, std::chrono::seconds(60));
  ASSERT_TRUE(done.is_ok()) << done.status().to_string();
  EXPECT_EQ(done->tokens, reference_tokens(prompt, 6));
  EXPECT_TRUE(cluster.prefill[0]->alive() && cluster.decode[0]->alive() && cluster.gateway->alive())
      << cluster.logs();
}

// Bad files are refused at start, naming what is wrong (CAF reads them only when a peer
// connects, and then aborts the process).
TEST(ControlTls, BadFilesAreRefusedAtStart) {
  Pki pki;
  ASSERT_TRUE(make_pki(::testing::TempDir() + "/dserve-control-tls-bad", pki));
  const std::string dserve = std::string(DSERVE_BINARY);
  const auto start = [&](const std::vector<std::string>& tls) {
    std::string cmd = dserve + " serve --role prefill --model " + testing_support::tiny_dir() +
                      " --listen 127.0.0.1:0";
    for (const auto& a : tls)
      cmd += " '" + a + "'";
    return testing_support::run_command(cmd + " 2>&1");
  };
  // A FIFO where the CA should be: refused at once (an fopen of it would block the start).
  const std::string fifo = ::testing::TempDir() + "/dserve-control-tls-bad/ca.fifo";
  std::filesystem::remove(fifo);
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const auto& [tls, expected] :
       {std::pair{tls_args(pki.cert, pki.key, fifo), "is a FIFO; expected a regular file"},
        std::pair{tls_args(pki.cert, pki.other_key, pki.ca),
                  "is not the PEM private key of certificate"},
        std::pair{tls_args(pki.other_cert, pki.other_key, pki.ca), "is not accepted by CA"},
        std::pair{tls_args(pki.cert, pki.key, "/nonexistent/ca.pem"),
                  "cannot read control-plane TLS CA '/nonexistent/ca.pem'"},
        std::pair{std::vector<std::string>{"--control-tls-cert", pki.cert},
                  "needs a certificate, "
                  "its key and the "
                  "cluster CA"}}) {
    const auto r = start(tls);
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find(expected), std::string::npos) << r.output;
  }
}

}  // namespace
}  // namespace dserve
