// The one registration file of the moetrain extension: device kernels for the ops that
// moetrain/ops defines in Python (schemas, autograd and fake kernels live there). There is no
// TORCH_LIBRARY block here on purpose: Python owns the op definitions, and moetrain.ops loads this
// library only after defining them. The CUDA block is compiled only in a CUDA build (WITH_CUDA).
#include <torch/library.h>

#include "expert_sort.h"
#include "permute.h"

TORCH_LIBRARY_IMPL(moetrain, CPU, m) {
  m.impl("permute", &moetrain::permute_cpu);
  m.impl("unpermute", &moetrain::unpermute_cpu);
  m.impl("unpermute_backward", &moetrain::unpermute_backward_cpu);
  m.impl("expert_sort", &moetrain::expert_sort_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(moetrain, CUDA, m) {
  m.impl("permute", &moetrain::permute_cuda);
  m.impl("unpermute", &moetrain::unpermute_cuda);
  m.impl("unpermute_backward", &moetrain::unpermute_backward_cuda);
  m.impl("expert_sort", &moetrain::expert_sort_cuda);
}
#endif
