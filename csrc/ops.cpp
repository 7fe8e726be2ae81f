// Operator schemas of the rlhfv library and the (empty) Python module that loads them.
//
// Only schemas live here; each device registers its kernels in its own file (csrc/cpu, csrc/cuda) and the Python
// side (rlhfv_kernels/_ops.py) adds fake kernels and autograd. Keep this file free of heavy includes: it is rebuilt
// often and <torch/extension.h> alone costs a minute of compile time.
#include <Python.h>
#include <torch/library.h>

extern "C" {
const char* rlhfv_cpu_variant();  // csrc/cpu/logprob_cpu.cpp

static PyObject* cpu_variant(PyObject*, PyObject*) { return PyUnicode_FromString(rlhfv_cpu_variant()); }

static PyMethodDef methods[] = {
    {"cpu_variant", cpu_variant, METH_NOARGS, "the SIMD variant of the CPU kernels this CPU runs"},
    {nullptr, nullptr, 0, nullptr}};

// `import rlhfv_kernels._C` runs the static TORCH_LIBRARY initializers below; the module holds one function.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "rlhfv compiled kernels (operators live in torch.ops.rlhfv)", -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rlhfv, m) {
  // Every operator takes (temperature, softcap) and works on the transformed logits z over the last dimension:
  //   z = x / temperature                              when softcap == 0
  //   z = softcap * tanh(x / softcap) / temperature    when softcap > 0, with dz/dx = sech^2(x / softcap) / temperature
  // (A model's logit scale s is folded in by the Python side: temperature / s and softcap / s.)
  // Per-token log-probability of `labels` under softmax(z).
  // logits: [..., V] with unit stride along V and any strides elsewhere; labels: logits.shape[:-1], int32/int64.
  // Returns (logp float32, lse float64), both of labels' shape; 0 where labels == ignore_index. The LSE is float64
  // (N values, negligible memory) so the backward's exp(x - lse) keeps fp32 accuracy at |logits| ~ 1e4.
  // `inplace_backward` does not change the forward; it tells the autograd formula to write dlogits into the logits.
  m.def(
      "logprob_fwd(Tensor logits, Tensor labels, int ignore_index, float temperature, float softcap,"
      " bool inplace_backward)"
      " -> (Tensor, Tensor)");
  // dlogits = grad_logp[t] * (onehot(labels[t]) - softmax(z[t])) * dz/dx, zero rows where
  // labels == ignore_index; a new contiguous tensor of logits' shape and dtype.
  m.def(
      "logprob_bwd(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index, float temperature,"
      " float softcap) -> Tensor");
  // The same gradient written over `logits` itself (its values are consumed).
  m.def(
      "logprob_bwd_(Tensor(a!) logits, Tensor grad_logp, Tensor labels, Tensor lse, int ignore_index,"
      " float temperature, float softcap) -> ()");
  // The same with the entropy H = -sum_v p_v log p_v of softmax(z) per row (0 where ignored), from the same single
  // pass: returns (logp, entropy, lse), entropy in logp's dtype.
  m.def(
      "logprob_entropy_fwd(Tensor logits, Tensor labels, int ignore_index, float temperature, float softcap,"
      " bool inplace_backward) -> (Tensor, Tensor, Tensor)");
  // dlogits of grad_logp * logp + grad_entropy * entropy; dH/dz_j = -p_j (log p_j + H).
  m.def(
      "logprob_entropy_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor logits, Tensor labels, Tensor lse,"
      " Tensor entropy, int ignore_index, float temperature, float softcap) -> Tensor");
  m.def(
      "logprob_entropy_bwd_(Tensor(a!) logits, Tensor grad_logp, Tensor grad_entropy, Tensor labels, Tensor lse,"
      " Tensor entropy, int ignore_index, float temperature, float softcap) -> ()");
  // The fused-linear path: logits = hidden @ weight.T (+ bias) are computed `chunk_rows` tokens at a time and never
  // stored whole. hidden [..., H], weight [V, H], bias [V] or None, labels hidden.shape[:-1].
  // Returns (logp, lse) like logprob_fwd.
  m.def(
      "linear_logprob_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
      " float temperature, float softcap, int chunk_rows) -> (Tensor, Tensor)");
  // Recomputes each chunk's logits and returns (dhidden, dweight, dbias); dbias is empty when bias is None.
  // dweight and dbias are accumulated in fp32 (fp64 for fp64 inputs) and returned in the weight's dtype.
  m.def(
      "linear_logprob_bwd(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse,"
      " int ignore_index, float temperature, float softcap, int chunk_rows) -> (Tensor, Tensor, Tensor)");
  // With the entropy, as logprob_entropy_fwd / logprob_entropy_bwd.
  m.def(
      "linear_logprob_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index,"
      " float temperature, float softcap, int chunk_rows) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprob_entropy_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor hidden, Tensor weight, Tensor? bias,"
      " Tensor labels, Tensor lse, Tensor entropy, int ignore_index, float temperature, float softcap,"
      " int chunk_rows) -> (Tensor, Tensor, Tensor)");
}
