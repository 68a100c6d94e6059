// Splicing CUDA-graph IF nodes into a stream capture that someone else (torch.cuda.graph) runs.
//
// Plain C++ over the CUDA runtime; no torch headers here, so csrc/conditional_graph.cu compiles
// quickly with nvcc and bindings.cpp (the torch side) with the host compiler.
//
// How one skippable sub-path becomes an IF node (all on the host, during capture):
//   create_conditions  once, at the start of the capture: one conditional handle per IF node on
//                      the capturing graph, and one setter kernel on the capture stream that writes
//                      every handle's value from the int32 skip mask on each replay;
//   begin_if           appends an IF node after the capture stream's current dependencies, makes the
//                      node the stream's only dependency, and starts capturing `body` into the node's
//                      body graph;
//   end_if             ends the body capture.
// Kernels launched on `body` between begin_if and end_if run only when the handle's value is 1.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

// IF nodes with device-set conditions need the CUDA 12.4 runtime API (conditional handles, the
// edge-data variants of the capture calls); with an older toolkit the module still builds, reports
// has_conditional_nodes() == false, and the engine uses its early-exit mechanism instead.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12040
#define ADN_HAS_CONDITIONAL_NODES 1
#else
#define ADN_HAS_CONDITIONAL_NODES 0
#endif

namespace adn {

// One setter kernel writes all conditions; its handles travel in the kernel parameters (by value).
constexpr int kMaxConditions = 64;

// Whether `stream` is capturing right now (cudaStreamIsCapturing also works in global mode).
cudaError_t stream_is_capturing(cudaStream_t stream, bool* capturing);

// Creates `count` conditional handles on the graph `capture` is capturing into and launches the
// setter kernel on `capture`: on every replay handle j gets the value (mask[mask_index[j]] != 0).
// mask: device pointer to int32; mask_index: host array of `count` indices into mask.
cudaError_t create_conditions(cudaStream_t capture, const int32_t* mask, const int32_t* mask_index, int count,
                              uint64_t* handles_out);

// Appends an IF node with `handle` to the capture on `capture` and begins capturing `body` (a
// stream that is not capturing) into the node's body graph.
cudaError_t begin_if(cudaStream_t capture, cudaStream_t body, uint64_t handle);

// Ends the body capture that begin_if started on `body`.
cudaError_t end_if(cudaStream_t body);

}  // namespace adn
