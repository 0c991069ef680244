// A kernel issuing puts through the direct back end (lamina_net/direct/):
// compiled by nvcc in the tests (sm_80, sm_90) to show the same queue code that
// the CPU tests run builds for the GPU, for mlx5 and rxe bytes alike.
#include <lamina_net/direct/mlx5.cuh>
#include <lamina_net/direct/rxe.cuh>

template <typename Format>
__global__ void put_then_flush(lamina::direct::DirectQueue q, lamina::direct::DirectRequest r, int* status) {
  lamina_u64 ticket = 0;
  lamina::DeviceStatus st = lamina::direct::post<Format>(q, r, threadIdx.x == 0, &ticket);
  if (st == lamina::kDeviceOk && threadIdx.x == 0) {
    st = lamina::direct::put_signal<Format>(q, r, r.remote_addr + 64, r.rkey, 1, r.local_addr + 64, r.lkey, &ticket);
  }
  if (st == lamina::kDeviceOk) st = lamina::direct::flush<Format>(q);
  if (st == lamina::kDeviceOk) st = lamina::direct::wait_completed<Format>(q, ticket);
  atomicMax(status, static_cast<int>(st));
}

template __global__ void put_then_flush<lamina::direct::Mlx5Format>(lamina::direct::DirectQueue,
                                                                    lamina::direct::DirectRequest, int*);
template __global__ void put_then_flush<lamina::direct::RxeFormat>(lamina::direct::DirectQueue,
                                                                   lamina::direct::DirectRequest, int*);
