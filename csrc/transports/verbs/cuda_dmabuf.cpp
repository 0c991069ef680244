#include "transports/verbs/cuda_dmabuf.hpp"

#include <dlfcn.h>
#include <unistd.h>

#include <type_traits>

namespace lamina::verbs {
namespace {

// The few CUDA driver API types and constants we need (from cuda.h, stable ABI).
using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUcontext = void*;
constexpr CUresult kCudaSuccess = 0;
constexpr int kRangeHandleTypeDmabufFd = 1;  // CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD
constexpr int kPointerAttributeContext = 1;  // CU_POINTER_ATTRIBUTE_CONTEXT

struct CudaDriver {
  CUresult (*init)(unsigned int flags) = nullptr;
  CUresult (*get_handle_for_address_range)(void* handle, CUdeviceptr ptr, size_t size, int type,
                                           unsigned long long flags) = nullptr;
  CUresult (*pointer_get_attribute)(void* data, int attribute, CUdeviceptr ptr) = nullptr;
  CUresult (*ctx_push_current)(CUcontext context) = nullptr;
  CUresult (*ctx_pop_current)(CUcontext* context) = nullptr;
  CUresult (*get_error_string)(CUresult error, const char** text) = nullptr;
  std::string why;  // empty when loaded

  std::string error_text(CUresult error) const {
    const char* text = nullptr;
    if (get_error_string != nullptr) get_error_string(error, &text);
    return std::string(text != nullptr ? text : "unknown CUDA error") + " (CUresult " + std::to_string(error) + ")";
  }
};

CudaDriver load_cuda_driver() {
  CudaDriver driver;
  void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* error = dlerror();
    driver.why = std::string("cannot load libcuda.so.1: ") + (error != nullptr ? error : "unknown");
    return driver;
  }
  auto bind = [&](const char* symbol, auto& slot) {
    slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(dlsym(library, symbol));
    if (slot == nullptr && driver.why.empty()) driver.why = std::string("libcuda.so.1 has no ") + symbol;
  };
  bind("cuInit", driver.init);
  bind("cuMemGetHandleForAddressRange", driver.get_handle_for_address_range);
  bind("cuPointerGetAttribute", driver.pointer_get_attribute);
  bind("cuCtxPushCurrent_v2", driver.ctx_push_current);
  bind("cuCtxPopCurrent_v2", driver.ctx_pop_current);
  bind("cuGetErrorString", driver.get_error_string);
  if (driver.why.empty()) {
    CUresult rc = driver.init(0);
    if (rc != kCudaSuccess) driver.why = "cuInit failed: " + driver.error_text(rc);
  }
  return driver;
}

}  // namespace

DmabufExport& DmabufExport::operator=(DmabufExport&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    offset_ = other.offset_;
    other.fd_ = -1;
  }
  return *this;
}

DmabufExport::~DmabufExport() {
  if (fd_ >= 0) ::close(fd_);
}

DmabufExport export_cuda_dmabuf(const void* ptr, uint64_t size, std::string* why) {
  static const CudaDriver driver = load_cuda_driver();
  if (!driver.why.empty()) {
    *why = driver.why;
    return {};
  }
  // The range must be aligned to the host page size.
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t address = reinterpret_cast<uint64_t>(ptr);
  const uint64_t begin = address & ~(page - 1);
  const uint64_t end = (address + size + page - 1) & ~(page - 1);

  // The calling thread may have no current context: use the one that owns the memory.
  CUcontext owner = nullptr;
  CUresult rc = driver.pointer_get_attribute(&owner, kPointerAttributeContext, address);
  if (rc != kCudaSuccess || owner == nullptr) {
    *why = "cuPointerGetAttribute(CONTEXT) failed (not CUDA device memory?): " + driver.error_text(rc);
    return {};
  }
  rc = driver.ctx_push_current(owner);
  if (rc != kCudaSuccess) {
    *why = "cuCtxPushCurrent failed: " + driver.error_text(rc);
    return {};
  }
  int fd = -1;
  rc = driver.get_handle_for_address_range(&fd, begin, end - begin, kRangeHandleTypeDmabufFd, 0);
  CUcontext popped = nullptr;
  driver.ctx_pop_current(&popped);
  if (rc != kCudaSuccess || fd < 0) {
    *why = "cuMemGetHandleForAddressRange(DMA_BUF_FD) failed: " + driver.error_text(rc);
    return {};
  }
  return DmabufExport(fd, address - begin);
}

}  // namespace lamina::verbs
