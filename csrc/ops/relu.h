// ReLU and its gradient with torch's semantics for NaN and signed zeros, shared
// by the CPU and CUDA kernels.  Written as selects, not max(): x86 and PTX max
// instructions drop NaN, and a select keeps the loops vectorisable.
#pragma once

#include <c10/macros/Macros.h>

namespace densenet_fast {

// torch.relu(a): 0 where a < 0, else a (NaN stays NaN, -0 stays -0).
template <typename A>
C10_HOST_DEVICE inline A relu(A a) {
  return a < A(0) ? A(0) : a;
}

// torch's threshold_backward(grad, relu(a), 0): 0 where relu(a) <= 0, i.e. a <= 0,
// else grad (the gradient passes where a is NaN).
template <typename A>
C10_HOST_DEVICE inline A relu_backward(A grad, A a) {
  return a <= A(0) ? A(0) : grad;
}

}  // namespace densenet_fast
