// Python bindings of adaptive_kernels._C: the conditional-node splice (conditional_graph.h) and the
// versions this module was built against. Streams are passed as the integer handles torch exposes
// (torch.cuda.Stream.cuda_stream), so the caller states exactly which stream is capturing.
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <string>
#include <utility>
#include <vector>

#include "conditional_graph.h"

#ifndef ADN_BUILT_TORCH
#error "ADN_BUILT_TORCH (the torch version string) must be defined by the build (setup.py / CMakeLists.txt)"
#endif
#ifndef ADN_BUILT_CUDA
#error "ADN_BUILT_CUDA (torch's CUDA version string) must be defined by the build (setup.py / CMakeLists.txt)"
#endif

namespace {

#define ADN_CUDA_CHECK(expr, what)                                                                          \
  do {                                                                                                       \
    cudaError_t err_ = (expr);                                                                               \
    TORCH_CHECK(err_ == cudaSuccess, what, " failed: ", cudaGetErrorName(err_), " (", cudaGetErrorString(err_), \
                ")");                                                                                        \
  } while (0)

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)); }

void check_supported() {
  TORCH_CHECK(ADN_HAS_CONDITIONAL_NODES,
              "adaptive_kernels._C was built with CUDA runtime ", CUDART_VERSION,
              " which has no conditional graph nodes (needs >= 12040, i.e. CUDA 12.4); use mechanism=\"early_exit\"");
}

bool is_capturing(int64_t stream) {
  bool capturing = false;
  ADN_CUDA_CHECK(adn::stream_is_capturing(as_stream(stream), &capturing), "cudaStreamIsCapturing");
  return capturing;
}

std::vector<uint64_t> create_conditions(int64_t capture_stream, const torch::Tensor& mask,
                                        const std::vector<int64_t>& mask_index) {
  check_supported();
  TORCH_CHECK(mask.is_cuda(), "create_conditions: mask must be a CUDA tensor, got device ", mask.device());
  TORCH_CHECK(mask.scalar_type() == torch::kInt32, "create_conditions: mask must be int32, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && mask.is_contiguous(), "create_conditions: mask must be a contiguous 1-D tensor, got "
              "shape ", mask.sizes());
  const int64_t count = static_cast<int64_t>(mask_index.size());
  TORCH_CHECK(count >= 1 && count <= adn::kMaxConditions, "create_conditions: between 1 and ", adn::kMaxConditions,
              " IF nodes per graph are supported, got ", count);
  std::vector<int32_t> index(mask_index.size());
  for (int64_t j = 0; j < count; ++j) {
    TORCH_CHECK(mask_index[j] >= 0 && mask_index[j] < mask.numel(), "create_conditions: mask_index[", j, "] = ",
                mask_index[j], " is outside the mask of length ", mask.numel());
    index[j] = static_cast<int32_t>(mask_index[j]);
  }
  TORCH_CHECK(is_capturing(capture_stream),
              "create_conditions: the capture stream is not capturing; call it inside torch.cuda.graph(...)");
  std::vector<uint64_t> handles(mask_index.size());
  ADN_CUDA_CHECK(adn::create_conditions(as_stream(capture_stream), mask.data_ptr<int32_t>(), index.data(),
                                        static_cast<int>(count), handles.data()),
                 "create_conditions (cudaGraphConditionalHandleCreate / setter kernel launch)");
  return handles;
}

void begin_if(int64_t capture_stream, int64_t body_stream, uint64_t handle) {
  check_supported();
  TORCH_CHECK(capture_stream != body_stream, "begin_if: the body needs its own stream, not the capture stream");
  TORCH_CHECK(is_capturing(capture_stream),
              "begin_if: the capture stream is not capturing; call it inside torch.cuda.graph(...)");
  TORCH_CHECK(!is_capturing(body_stream),
              "begin_if: the body stream is already capturing (an IF body was opened and not closed with end_if)");
  ADN_CUDA_CHECK(adn::begin_if(as_stream(capture_stream), as_stream(body_stream), handle),
                 "begin_if (cudaGraphAddNode of an IF node / cudaStreamBeginCaptureToGraph)");
}

void end_if(int64_t body_stream) {
  check_supported();
  TORCH_CHECK(is_capturing(body_stream), "end_if: the body stream is not capturing (no open begin_if)");
  ADN_CUDA_CHECK(adn::end_if(as_stream(body_stream)), "end_if (cudaStreamEndCapture of the IF body)");
}

int runtime_version() {
  int version = 0;
  ADN_CUDA_CHECK(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

int driver_version() {
  int version = 0;
  ADN_CUDA_CHECK(cudaDriverGetVersion(&version), "cudaDriverGetVersion");
  return version;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adaptive_kernels CUDA extension: CUDA-graph IF nodes spliced into a torch stream capture";
  m.def("built_with", []() { return std::make_pair(std::string(ADN_BUILT_TORCH), std::string(ADN_BUILT_CUDA)); },
        "(torch version, torch CUDA version) this module was compiled against");
  m.def("compiled_cuda_runtime", []() { return CUDART_VERSION; },
        "CUDART_VERSION of the toolkit headers this module was compiled with, e.g. 13000");
  m.def("has_conditional_nodes", []() { return static_cast<bool>(ADN_HAS_CONDITIONAL_NODES); },
        "whether the IF-node functions were compiled in (CUDA toolkit >= 12.4)");
  m.def("max_conditions", []() { return adn::kMaxConditions; }, "most IF nodes one graph may hold");
  m.def("runtime_version", &runtime_version, "cudaRuntimeGetVersion() of the loaded CUDA runtime");
  m.def("driver_version", &driver_version, "cudaDriverGetVersion(): the newest CUDA the driver supports (0: none)");
  m.def("is_capturing", &is_capturing, py::arg("stream"), "whether the stream (a cuda_stream integer) is capturing");
  m.def("create_conditions", &create_conditions, py::arg("capture_stream"), py::arg("mask"), py::arg("mask_index"),
        "Inside a capture on capture_stream: create one conditional handle per entry of mask_index and launch the "
        "kernel that sets handle j to (mask[mask_index[j]] != 0) on every replay. Returns the handles.");
  m.def("begin_if", &begin_if, py::arg("capture_stream"), py::arg("body_stream"), py::arg("handle"),
        "Append an IF node on `handle` to the capture and start capturing body_stream into its body.");
  m.def("end_if", &end_if, py::arg("body_stream"), "Finish the IF body begun by begin_if on body_stream.");
}
