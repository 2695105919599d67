#!/usr/bin/env bash
# Installs everything dserve needs on Debian 12: the Debian packages and the npm packages of
# the tokenizer oracle. Idempotent: a second run installs nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  g++ cmake ninja-build pkg-config git ca-certificates clang-format
  # scripts/tidy.sh, which scripts/test.sh (so CI) runs: Debian 12's clang-tidy is version 14.
  clang-tidy
  libcaf-dev libucx-dev ucx-utils librocksdb-dev
  libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc
  libyaml-cpp-dev nlohmann-json3-dev libcpp-httplib-dev libcli11-dev libfmt-dev libspdlog-dev
  libpcre2-dev libopenblas-dev libzstd-dev liblz4-dev libxxhash-dev
  zlib1g-dev libssl-dev iproute2
  openssl openssh-client openssh-server
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-torch python3-numpy
  # The Slurm launcher's test runs a one-host Slurm cluster (tests/serving/slurm_cluster.h).
  slurmctld slurmd slurm-client munge
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js runs the tokenizer oracle; a machine may already have it from elsewhere.
if ! command -v node >/dev/null 2>&1; then missing+=(nodejs npm); fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "dserve: installing ${#missing[@]} Debian packages: ${missing[*]}"
  # No package may start a service while it installs (openssh-server's sshd would listen on
  # every address; the ssh test starts its own on loopback): a policy-rc.d that says so, for
  # this install only.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "dserve: Debian packages already installed"
fi

# The tokenizer oracle (DeepSeek's tokenizer.json and the JavaScript tokenizer), pinned by
# its package-lock.json.
if [ -f tools/tokenizer-oracle/package.json ]; then
  if [ ! -d tools/tokenizer-oracle/node_modules ]; then
    echo "dserve: installing the tokenizer oracle from npm"
    (cd tools/tokenizer-oracle && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi

# The official OpenAI Node client, which the tests run against the OpenAI-compatible API, pinned
# by its package-lock.json.
if [ -f tools/openai-client/package.json ] && [ ! -d tools/openai-client/node_modules ]; then
  echo "dserve: installing the OpenAI client check from npm"
  (cd tools/openai-client && npm ci --no-audit --no-fund --loglevel=error)
fi

# The Prometheus text-format parser (parse-prometheus-text-format) that tests/ops reads
# /metrics with, pinned by its package-lock.json.
if [ -f tools/prom-parser/package.json ] && [ ! -d tools/prom-parser/node_modules ]; then
  echo "dserve: installing the Prometheus text-format parser from npm"
  (cd tools/prom-parser && npm ci --no-audit --no-fund --loglevel=error)
fi
