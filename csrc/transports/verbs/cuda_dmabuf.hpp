// lamina-net verbs: exporting CUDA device memory as a dma-buf, for
// ibv_reg_dmabuf_mr (GPUDirect RDMA without the nvidia-peermem module).
//
// libcuda.so.1 is dlopen'ed on first use; nothing here links against CUDA, so
// builds and machines without it are unaffected (the export just fails with
// the reason).
#pragma once

#include <cstdint>
#include <string>

namespace lamina::verbs {

// A dma-buf file descriptor that covers a page-aligned range around the
// exported memory. `offset` is where the requested pointer lies inside it.
// Owns the fd (closed on destruction; the MR keeps its own reference).
class DmabufExport {
 public:
  DmabufExport() = default;
  DmabufExport(int fd, uint64_t offset) : fd_(fd), offset_(offset) {}
  DmabufExport(const DmabufExport&) = delete;
  DmabufExport& operator=(const DmabufExport&) = delete;
  DmabufExport(DmabufExport&& other) noexcept : fd_(other.fd_), offset_(other.offset_) { other.fd_ = -1; }
  DmabufExport& operator=(DmabufExport&& other) noexcept;
  ~DmabufExport();
  int fd() const { return fd_; }
  uint64_t offset() const { return offset_; }
  bool valid() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
  uint64_t offset_ = 0;
};

// Exports [ptr, ptr+size) of CUDA device memory with
// cuMemGetHandleForAddressRange(DMA_BUF_FD). On failure returns an invalid
// export and sets *why (libcuda missing, driver too old, not device memory,
// no dma-buf support in the kernel/driver, ...).
DmabufExport export_cuda_dmabuf(const void* ptr, uint64_t size, std::string* why);

}  // namespace lamina::verbs
