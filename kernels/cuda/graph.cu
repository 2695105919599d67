// Launch set-up for captured decode steps: shared memory granted up front, a cuBLAS workspace
// of our own, a capturable stream, and instantiated graphs.

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {

Status reserve_shared_memory(size_t attention_bytes, size_t indexer_bytes) {
  DSERVE_RETURN_IF_ERROR(reserve_attention_shared(attention_bytes));
  return reserve_indexer_shared(indexer_bytes);
}

Status set_blas_workspace(BlasHandle& blas, void* workspace, size_t bytes) {
  blas.use_workspace(workspace, bytes);
  return cublas_status(cublasSetWorkspace(handle_of(blas), workspace, bytes), "cublasSetWorkspace");
}

Result<OwnedStream> OwnedStream::create() {
  cudaStream_t stream = nullptr;
  DSERVE_RETURN_IF_ERROR(cuda_status(cudaStreamCreate(&stream), "cudaStreamCreate"));
  return OwnedStream(stream);
}

OwnedStream& OwnedStream::operator=(OwnedStream&& other) noexcept {
  if (this != &other) {
    if (handle_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(handle_));
    handle_ = other.handle_;
    other.handle_ = nullptr;
  }
  return *this;
}

OwnedStream::~OwnedStream() {
  if (handle_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(handle_));
}

CapturedGraph& CapturedGraph::operator=(CapturedGraph&& other) noexcept {
  if (this != &other) {
    if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
    exec_ = other.exec_;
    other.exec_ = nullptr;
  }
  return *this;
}

CapturedGraph::~CapturedGraph() {
  if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
}

Result<CapturedGraph> CapturedGraph::capture(CudaStream stream,
                                             const std::function<Status()>& work) {
  DSERVE_CHECK_MSG(stream.handle != nullptr, "the legacy default stream cannot be captured");
  DSERVE_RETURN_IF_ERROR(
      cuda_status(cudaStreamBeginCapture(native(stream), cudaStreamCaptureModeThreadLocal),
                  "cudaStreamBeginCapture"));
  const Status enqueued = work();
  cudaGraph_t graph = nullptr;
  const Status ended =
      cuda_status(cudaStreamEndCapture(native(stream), &graph), "cudaStreamEndCapture");
  if (!enqueued.is_ok() || !ended.is_ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return enqueued.is_ok() ? ended : enqueued;
  }
  cudaGraphExec_t exec = nullptr;
  const Status instantiated =
      cuda_status(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  cudaGraphDestroy(graph);
  if (!instantiated.is_ok()) return instantiated;
  return CapturedGraph(exec);
}

Status CapturedGraph::launch(CudaStream stream) const {
  DSERVE_CHECK(exec_ != nullptr);
  return cuda_status(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), native(stream)),
                     "cudaGraphLaunch");
}

}  // namespace dserve::kernels::cuda
