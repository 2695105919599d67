# Every third-party library the project uses, found once, here (see scripts/install-deps.sh).
find_package(Threads REQUIRED)
find_package(PkgConfig REQUIRED)
find_package(nlohmann_json CONFIG REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(fmt CONFIG REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)

# CPU GEMM for the reference backend: OpenBLAS through its CBLAS interface.
find_package(BLAS REQUIRED)
find_path(DSERVE_CBLAS_INCLUDE cblas.h PATHS /usr/include/x86_64-linux-gnu/openblas-pthread
  /usr/include/openblas /usr/include REQUIRED)

if(DSERVE_BUILD_TESTS)
  find_package(GTest REQUIRED)
  include(GoogleTest)
endif()
if(DSERVE_BUILD_BENCH)
  find_package(benchmark REQUIRED)
endif()

# kvstore: RocksDB (the shared library; RocksDB::rocksdb is the static one) and xxHash (block
# keys and checksums).
find_package(RocksDB CONFIG REQUIRED)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)
