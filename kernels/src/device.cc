#include "dserve/kernels/device.h"

#if DSERVE_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <charconv>
#include <string_view>
#endif

namespace dserve::kernels {

#if DSERVE_HAVE_CUDA
namespace {

// True when code built for the CUDA architectures `archs` ("90a", "80,90", "90-real")
// runs on a device of compute capability major.minor. An arch-specific target ("90a") runs on
// that exact capability only; the others also run on later ones (SASS within a major, PTX
// beyond it), which is close enough to pick a reason to print.
bool arch_list_runs_on(std::string_view archs, int major, int minor) {
  const int device = major * 10 + minor;
  while (!archs.empty()) {
    const size_t end = archs.find(',');
    const std::string_view entry = archs.substr(0, end);
    archs = end == std::string_view::npos ? std::string_view{} : archs.substr(end + 1);
    int arch = 0;
    const auto [rest, ec] = std::from_chars(entry.data(), entry.data() + entry.size(), arch);
    if (ec != std::errc{}) continue;
    const bool specific = rest != entry.data() + entry.size() && *rest == 'a';
    if (specific ? device == arch : device >= arch) return true;
  }
  return false;
}

std::string runtime_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

}  // namespace

bool cuda_backend_built() {
  return true;
}

DeviceInfo probe_cuda_device(int index) {
  DeviceInfo info;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // the failed call must not surface again in an unrelated check
    info.why_unavailable = "cudaGetDeviceCount failed (" + runtime_error_text(err) + ")";
    if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice) {
      int runtime = 0;
      cudaRuntimeGetVersion(&runtime);
      info.why_unavailable += ": no NVIDIA GPU, or no driver recent enough for CUDA runtime " +
                              std::to_string(runtime / 1000) + "." +
                              std::to_string(runtime % 1000 / 10);
    }
    return info;
  }
  if (count == 0) {
    info.why_unavailable = "the CUDA runtime sees no device";
    return info;
  }
  if (index < 0 || index >= count) {
    info.why_unavailable = "there is no CUDA device " + std::to_string(index) +
                           ": the runtime sees " + std::to_string(count) +
                           " (cuda:0 to cuda:" + std::to_string(count - 1) + ")";
    return info;
  }
  cudaDeviceProp prop{};
  const cudaError_t prop_err = cudaGetDeviceProperties(&prop, index);
  if (prop_err != cudaSuccess) {
    cudaGetLastError();
    info.why_unavailable = "cudaGetDeviceProperties(" + std::to_string(index) + ") failed (" +
                           runtime_error_text(prop_err) + ")";
    return info;
  }
  info.name = prop.name;
  info.compute_major = prop.major;
  info.compute_minor = prop.minor;
  info.memory_bytes = prop.totalGlobalMem;
  info.shared_memory_per_block = prop.sharedMemPerBlockOptin;
  if (!arch_list_runs_on(DSERVE_CUDA_ARCHITECTURES, prop.major, prop.minor)) {
    info.why_unavailable = info.name + " has compute capability " + std::to_string(prop.major) +
                           "." + std::to_string(prop.minor) +
                           ", and this build carries code for CUDA architectures " +
                           DSERVE_CUDA_ARCHITECTURES + " only";
    return info;
  }
  info.available = true;
  return info;
}

std::string select_cuda_device(int index) {
  const DeviceInfo info = probe_cuda_device(index);
  if (!info.available) return info.why_unavailable;
  const cudaError_t err = cudaSetDevice(index);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return "cudaSetDevice(" + std::to_string(index) + ") failed (" + runtime_error_text(err) + ")";
  }
  return {};
}

bool make_cuda_device_current(int index) {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current == index) return true;
  if (cudaSetDevice(index) == cudaSuccess) return true;
  cudaGetLastError();
  return false;
}

#else

bool cuda_backend_built() {
  return false;
}

DeviceInfo probe_cuda_device(int /*index*/) {
  DeviceInfo info;
  info.why_unavailable = "built without the CUDA backend";
  return info;
}

std::string select_cuda_device(int index) {
  return probe_cuda_device(index).why_unavailable;
}

bool make_cuda_device_current(int /*index*/) {
  return false;
}

#endif

}  // namespace dserve::kernels
