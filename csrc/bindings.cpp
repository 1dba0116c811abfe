// Every schema of the hiprune namespace, declared once. Backends register their kernels in their own files.
#include <torch/library.h>

#ifdef HIPRUNE_PYTHON_MODULE
#include <Python.h>

// Importing hiprune_ops._C loads this library, which runs the registrations below and in the kernel files.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(hiprune, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("attention_scores(Tensor attn, int num_prefix=0) -> Tensor", tags);
  m.def(
      "qk_scores(Tensor q, Tensor k, float scale, int num_prefix=0, Tensor? cu_seqlens=None, Tensor? lse=None) "
      "-> Tensor",
      tags);
  m.def(
      "select(Tensor object_attn, Tensor deep_attn, int budget, int grid_h, int grid_w, float alpha=0.1, "
      "int num_prefix=0, str neighborhood=\"cross\", bool official=False) -> Tensor",
      tags);
  m.def(
      "select_with_roles(Tensor object_attn, Tensor deep_attn, int budget, int grid_h, int grid_w, "
      "float alpha=0.1, int num_prefix=0, str neighborhood=\"cross\", bool official=False) -> (Tensor, Tensor)",
      tags);
  m.def(
      "prune(Tensor features, Tensor object_attn, Tensor deep_attn, int budget, int grid_h, int grid_w, "
      "float alpha=0.1, int num_prefix=0, str neighborhood=\"cross\", bool official=False) -> (Tensor, Tensor)",
      tags);
  m.def("prompt_select(Tensor features, Tensor prompt, Tensor indices, Tensor roles, int extra) -> (Tensor, Tensor)",
        tags);
}
