// C++ test of the IF-node splice (conditional_graph.h) without torch: an ordinary stream capture of
// "mandatory" kernels with one IF node per stage whose body is captured on a second stream, replayed
// for every mask. Exit code 0: pass, 1: fail, 77: skipped (no GPU, or a toolkit without IF nodes).
// Built and registered with CTest by CMakeLists.txt.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "conditional_graph.h"

#define CHECK(expr)                                                                       \
  do {                                                                                    \
    cudaError_t err_ = (expr);                                                            \
    if (err_ != cudaSuccess) {                                                            \
      std::printf("FAILED: %s: %s\n", #expr, cudaGetErrorString(err_));                   \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

__global__ void affine(float* y, int n, float a, float b) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = y[i] * a + b;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  if (!ADN_HAS_CONDITIONAL_NODES) {
    std::printf("SKIPPED: built with a CUDA toolkit older than 12.4 (no conditional nodes)\n");
    return 77;
  }
  constexpr int kStages = 4, kN = 4096, kThreads = 256, kBlocks = (kN + kThreads - 1) / kThreads;
  float* y = nullptr;
  int32_t* mask = nullptr;
  CHECK(cudaMalloc(&y, kN * sizeof(float)));
  CHECK(cudaMalloc(&mask, kStages * sizeof(int32_t)));
  cudaStream_t capture, body;
  CHECK(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking));
  CHECK(cudaStreamCreateWithFlags(&body, cudaStreamNonBlocking));

  // Stage s: mandatory y = 0.5 y + 1, then (if mask[s]) y = 0.9 y + 0.1. Stages are indexed in reverse
  // order in the handles so that a mix-up of handle and mask index would show.
  std::vector<int32_t> mask_index(kStages);
  for (int j = 0; j < kStages; ++j) mask_index[j] = kStages - 1 - j;
  std::vector<uint64_t> handles(kStages);
  CHECK(cudaStreamBeginCapture(capture, cudaStreamCaptureModeGlobal));
  CHECK(adn::create_conditions(capture, mask, mask_index.data(), kStages, handles.data()));
  for (int j = 0; j < kStages; ++j) {
    affine<<<kBlocks, kThreads, 0, capture>>>(y, kN, 0.5f, 1.0f);
    CHECK(adn::begin_if(capture, body, handles[j]));
    affine<<<kBlocks, kThreads, 0, body>>>(y, kN, 0.9f, 0.1f);
    CHECK(adn::end_if(body));
  }
  cudaGraph_t graph;
  CHECK(cudaStreamEndCapture(capture, &graph));
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, graph, 0));

  int failures = 0;
  for (int bits = 0; bits < (1 << kStages); ++bits) {
    int32_t run[kStages];
    for (int s = 0; s < kStages; ++s) run[s] = (bits >> s) & 1;
    CHECK(cudaMemcpy(mask, run, sizeof(run), cudaMemcpyHostToDevice));
    CHECK(cudaMemset(y, 0, kN * sizeof(float)));
    CHECK(cudaGraphLaunch(exec, capture));
    CHECK(cudaStreamSynchronize(capture));
    float got = 0.0f;
    CHECK(cudaMemcpy(&got, y + kN - 1, sizeof(float), cudaMemcpyDeviceToHost));
    float want = 0.0f;
    for (int j = 0; j < kStages; ++j) {
      want = want * 0.5f + 1.0f;
      if (run[mask_index[j]]) want = want * 0.9f + 0.1f;
    }
    if (std::fabs(got - want) > 1e-5f) {
      std::printf("mask %d: got %f, want %f\n", bits, got, want);
      ++failures;
    }
  }
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  std::printf(failures ? "FAILED\n" : "OK: %d masks\n", 1 << kStages);
  return failures ? 1 : 0;
}
