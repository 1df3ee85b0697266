// Shared by the C++ CPU kernels and the CUDA kernels: one recurrence step, two launchers.
// Functions marked RWKV_HD compile for the host and, under nvcc, for the device too.
#pragma once

#ifdef __CUDACC__
#define RWKV_HD __host__ __device__ __forceinline__
#else
#define RWKV_HD inline
#endif

#include <math.h>
