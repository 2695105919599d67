#pragma once
// Which accelerator, if any, this process can use. Host code: compiles and runs without CUDA
// and without a GPU; a build with the CUDA backend asks the CUDA runtime (never the driver
// API, so that the binary starts on machines with no NVIDIA driver).

#include <cstddef>
#include <string>

namespace dserve::kernels {

// What probe_cuda_device() found. When `available` is false only `why_unavailable` is
// meaningful; when true it is empty and the other fields describe the device probed.
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

// Looks for a usable CUDA device: device `index` (cuda:N) of those the runtime sees. Never
// aborts: a build without the CUDA backend, a machine without a driver or GPU, an index past
// the devices present, and a GPU this build has no code for all come back as unavailable with
// the reason. Thread-safe; each call asks the runtime again.
DeviceInfo probe_cuda_device(int index = 0);

// Makes device `index` the calling thread's current device (cudaSetDevice), after probing it:
// the probe's reason when it is unusable.
std::string select_cuda_device(int index);  // empty on success

// The cheap part of select_cuda_device for a device already probed: makes it current on the
// calling thread (the CUDA runtime's current device is per thread, and actors move between
// threads). False when the runtime refuses.
bool make_cuda_device_current(int index);

}  // namespace dserve::kernels
