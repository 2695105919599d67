#pragma once
// Which accelerator, if any, this process can use. Host code: compiles and runs without CUDA
// and without a GPU; a build with the CUDA backend asks the CUDA runtime (never the driver
// API, so that the binary starts on machines with no NVIDIA driver).

#include <cstddef>
#include <string>

namespace dserve::kernels {

// What probe_cuda_device() found. When `available` is false only `why_unavailable` is
// meaningful; when true it is empty and the other fields describe device 0.
struct DeviceInfo {
  bool available = false;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  size_t memory_bytes = 0;
  size_t shared_memory_per_block = 0;  // the opt-in maximum one block may use
  std::string why_unavailable;         // a sentence a person can act on
};

// True when this build carries the CUDA backend (kernels/cuda); says nothing about whether a
// GPU is present at run time.
bool cuda_backend_built();

// Looks for a usable CUDA device (device 0). Never aborts: a build without the CUDA backend,
// a machine without a driver or GPU, and a GPU this build has no code for all come back as
// unavailable with the reason. Thread-safe; each call asks the runtime again.
DeviceInfo probe_cuda_device();

}  // namespace dserve::kernels
