#pragma once
// Stand-in for the CUDA header of the same name when kernels are compiled for the CPU emulation (cuda_emu.h).
#include "cuda_emu.h"
