// See conditional_graph.h for what these functions do and in which order they are called.
#include "conditional_graph.h"

#include <cuda_runtime.h>

namespace adn {

cudaError_t stream_is_capturing(cudaStream_t stream, bool* capturing) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaError_t err = cudaStreamIsCapturing(stream, &status);
  *capturing = status == cudaStreamCaptureStatusActive;
  return err;
}

#if ADN_HAS_CONDITIONAL_NODES

namespace {

struct Conditions {
  cudaGraphConditionalHandle handle[kMaxConditions];
  int32_t mask_index[kMaxConditions];
  int32_t count;
};

// One thread per IF node: its body runs on this replay iff its stage's mask entry is non-zero
// (mask contract: 1 = run the skippable sub-path, 0 = skip it).
__global__ void set_conditions_from_mask(Conditions conditions, const int32_t* __restrict__ mask) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < conditions.count) {
    cudaGraphSetConditional(conditions.handle[j], mask[conditions.mask_index[j]] != 0 ? 1u : 0u);
  }
}

// The capture API changed shape in CUDA 13: the unsuffixed names now take edge data, which CUDA 12.3+
// offered under the _v2/_v3 names. Edge data is carried through so non-default (programmatic) edges
// into the IF node are kept.
cudaError_t capture_info(cudaStream_t stream, cudaStreamCaptureStatus* status, cudaGraph_t* graph,
                         const cudaGraphNode_t** deps, const cudaGraphEdgeData** edges, size_t* num_deps) {
#if CUDART_VERSION >= 13000
  return cudaStreamGetCaptureInfo(stream, status, nullptr, graph, deps, edges, num_deps);
#else
  return cudaStreamGetCaptureInfo_v3(stream, status, nullptr, graph, deps, edges, num_deps);
#endif
}

cudaError_t add_node(cudaGraphNode_t* node, cudaGraph_t graph, const cudaGraphNode_t* deps,
                     const cudaGraphEdgeData* edges, size_t num_deps, cudaGraphNodeParams* params) {
#if CUDART_VERSION >= 13000
  return cudaGraphAddNode(node, graph, deps, edges, num_deps, params);
#else
  return cudaGraphAddNode_v2(node, graph, deps, edges, num_deps, params);
#endif
}

cudaError_t set_capture_dependencies(cudaStream_t stream, cudaGraphNode_t* node) {
#if CUDART_VERSION >= 13000
  return cudaStreamUpdateCaptureDependencies(stream, node, nullptr, 1, cudaStreamSetCaptureDependencies);
#else
  return cudaStreamUpdateCaptureDependencies_v2(stream, node, nullptr, 1, cudaStreamSetCaptureDependencies);
#endif
}

cudaError_t capturing_graph(cudaStream_t stream, cudaGraph_t* graph, const cudaGraphNode_t** deps,
                            const cudaGraphEdgeData** edges, size_t* num_deps) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaError_t err = capture_info(stream, &status, graph, deps, edges, num_deps);
  if (err != cudaSuccess) return err;
  return status == cudaStreamCaptureStatusActive ? cudaSuccess : cudaErrorIllegalState;
}

}  // namespace

cudaError_t create_conditions(cudaStream_t capture, const int32_t* mask, const int32_t* mask_index, int count,
                              uint64_t* handles_out) {
  if (count < 1 || count > kMaxConditions) return cudaErrorInvalidValue;
  cudaGraph_t graph = nullptr;
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t num_deps = 0;
  cudaError_t err = capturing_graph(capture, &graph, &deps, &edges, &num_deps);
  if (err != cudaSuccess) return err;
  Conditions conditions = {};
  conditions.count = count;
  for (int j = 0; j < count; ++j) {
    // No default value: the setter kernel assigns every handle before any IF node is reached.
    err = cudaGraphConditionalHandleCreate(&conditions.handle[j], graph, 0, 0);
    if (err != cudaSuccess) return err;
    conditions.mask_index[j] = mask_index[j];
    handles_out[j] = conditions.handle[j];
  }
  set_conditions_from_mask<<<1, kMaxConditions, 0, capture>>>(conditions, mask);
  return cudaGetLastError();
}

cudaError_t begin_if(cudaStream_t capture, cudaStream_t body, uint64_t handle) {
  cudaGraph_t graph = nullptr;
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t num_deps = 0;
  cudaError_t err = capturing_graph(capture, &graph, &deps, &edges, &num_deps);
  if (err != cudaSuccess) return err;
  cudaGraphNodeParams params = {};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = static_cast<cudaGraphConditionalHandle>(handle);
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = 1;
  cudaGraphNode_t node = nullptr;
  err = add_node(&node, graph, deps, edges, num_deps, &params);
  if (err != cudaSuccess) return err;
  // Everything captured after this on `capture` waits for the IF node (and so for its body).
  err = set_capture_dependencies(capture, &node);
  if (err != cudaSuccess) return err;
  // Relaxed: the body stream is a second capture; torch's global-mode capture must not see it as an
  // unsafe call from another capture sequence.
  return cudaStreamBeginCaptureToGraph(body, params.conditional.phGraph_out[0], nullptr, nullptr, 0,
                                       cudaStreamCaptureModeRelaxed);
}

cudaError_t end_if(cudaStream_t body) {
  cudaGraph_t body_graph = nullptr;
  return cudaStreamEndCapture(body, &body_graph);
}

#else  // CUDA runtime older than 12.4: the module builds, these report "not supported".

cudaError_t create_conditions(cudaStream_t, const int32_t*, const int32_t*, int, uint64_t*) {
  return cudaErrorNotSupported;
}
cudaError_t begin_if(cudaStream_t, cudaStream_t, uint64_t) { return cudaErrorNotSupported; }
cudaError_t end_if(cudaStream_t) { return cudaErrorNotSupported; }

#endif  // ADN_HAS_CONDITIONAL_NODES

}  // namespace adn
