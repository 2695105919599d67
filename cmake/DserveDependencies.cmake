# Every third-party library the project uses, found once, here (see scripts/install-deps.sh).
find_package(Threads REQUIRED)
find_package(PkgConfig REQUIRED)
find_package(nlohmann_json CONFIG REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(fmt CONFIG REQUIRED)
# cluster: manifests (yaml-cpp 0.7; its target is `yaml-cpp`, without a namespace).
find_package(yaml-cpp CONFIG REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
# ops: cpp-httplib for the metrics endpoint (Debian builds it as a library; its .pc gives the
# defines that match that build).
pkg_check_modules(HTTPLIB REQUIRED IMPORTED_TARGET cpp-httplib)

if(DSERVE_BUILD_TESTS)
  find_package(GTest REQUIRED)
  include(GoogleTest)
endif()
if(DSERVE_BUILD_BENCH)
  find_package(benchmark REQUIRED)
  # OpenBLAS through CBLAS: only gemm_bench's yardstick (the CPU backend has kernels of its own,
  # kernels/README.md).
  find_package(BLAS REQUIRED)
  find_path(DSERVE_CBLAS_INCLUDE cblas.h PATHS /usr/include/x86_64-linux-gnu/openblas-pthread
    /usr/include/openblas /usr/include REQUIRED)
endif()

# kvstore: RocksDB (the shared library; RocksDB::rocksdb is the static one) and xxHash (block
# keys and checksums).
find_package(RocksDB CONFIG REQUIRED)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)

# kvstore transfer: UCX 1.13 (its CMake config; link both ucx::ucp and ucx::ucs, ucp alone
# fails to link). Only kvstore/src/transfer_impl.h includes UCX headers.
find_package(ucx CONFIG REQUIRED)

# actors: CAF 0.17 (libcaf-dev) ships no CMake config and no .pc file: find the headers and the
# three libraries (core, io, and openssl for the control plane's mutual TLS) by hand and wrap
# them in one INTERFACE target. Its headers are marked SYSTEM so
# their warnings do not fail our -Werror build.
find_path(DSERVE_CAF_INCLUDE caf/all.hpp REQUIRED)
find_library(DSERVE_CAF_CORE caf_core REQUIRED)
find_library(DSERVE_CAF_IO caf_io REQUIRED)
find_library(DSERVE_CAF_OPENSSL caf_openssl REQUIRED)
find_package(OpenSSL REQUIRED)
add_library(dserve_caf INTERFACE)
add_library(dserve::caf ALIAS dserve_caf)
target_include_directories(dserve_caf SYSTEM INTERFACE ${DSERVE_CAF_INCLUDE})
target_link_libraries(dserve_caf INTERFACE ${DSERVE_CAF_OPENSSL} ${DSERVE_CAF_IO} ${DSERVE_CAF_CORE}
  OpenSSL::SSL OpenSSL::Crypto Threads::Threads)

# api: protobuf 3.21 (CMake's FindProtobuf: Debian ships no protobuf CMake config) and gRPC 1.51
# (its config; needs protobuf-compiler-grpc for gRPC::grpc_cpp_plugin).
find_package(Protobuf REQUIRED)
find_package(gRPC CONFIG REQUIRED)

# `dserve bundle`: zlib (gzip) and OpenSSL's libcrypto (SHA-256), both already loaded through
# gRPC.
find_package(ZLIB REQUIRED)
find_package(OpenSSL REQUIRED)

# HTTP (the OpenAI-compatible API): cpp-httplib through its .pc file (above), whose defines
# (OpenSSL, zlib, brotli support) must match how Debian built libcpp-httplib.so: the classes'
# layouts depend on them.
add_library(dserve_httplib INTERFACE)
add_library(dserve::httplib ALIAS dserve_httplib)
target_link_libraries(dserve_httplib INTERFACE PkgConfig::HTTPLIB Threads::Threads)
