// Host-side checks of the flat buckets that run every step, as two functions of the _C module.
//
// Each step the optimizer must know that every parameter still lives in its bucket and that every
// .grad is still the view it bound (or still None). Asked in Python that is a loop over the
// parameters; here it is one call per bucket and a few nanoseconds per parameter, so the Python
// work of a step does not grow with the number of tensors. fused_lesam/buckets.py has the same
// checks in Python for builds without this extension.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

namespace fused_lesam {
namespace {

// Borrowed items of a list or tuple argument, or nullptr with a TypeError set.
PyObject** items(PyObject* seq, Py_ssize_t* size, const char* name) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
    PyErr_Format(PyExc_TypeError, "%s must be a list or tuple", name);
    return nullptr;
  }
  *size = PySequence_Fast_GET_SIZE(seq);
  return PySequence_Fast_ITEMS(seq);
}

// first_moved(params, views) -> int: the index of the first parameter whose storage is no longer
// its view's (a different data pointer, dtype or device), or -1.
PyObject* first_moved(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "first_moved(params, views) takes 2 arguments");
    return nullptr;
  }
  Py_ssize_t n = 0, n_views = 0;
  PyObject** params = items(args[0], &n, "params");
  PyObject** views = params ? items(args[1], &n_views, "views") : nullptr;
  if (views == nullptr) {
    return nullptr;
  }
  if (n != n_views) {
    PyErr_SetString(PyExc_ValueError, "params and views differ in length");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(params[i]) || !THPVariable_Check(views[i])) {
      PyErr_SetString(PyExc_TypeError, "params and views must hold tensors");
      return nullptr;
    }
    const at::Tensor& p = THPVariable_Unpack(params[i]);
    const at::Tensor& v = THPVariable_Unpack(views[i]);
    if (p.data_ptr() != v.data_ptr() || p.scalar_type() != v.scalar_type() || p.device() != v.device()) {
      return PyLong_FromSsize_t(i);
    }
  }
  return PyLong_FromLong(-1);
}

// grads_changed(params, expected) -> bool: whether any parameter's .grad is not exactly the
// expected tensor object's (expected[i] None: the parameter must have no gradient).
PyObject* grads_changed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "grads_changed(params, expected) takes 2 arguments");
    return nullptr;
  }
  Py_ssize_t n = 0, n_expected = 0;
  PyObject** params = items(args[0], &n, "params");
  PyObject** expected = params ? items(args[1], &n_expected, "expected") : nullptr;
  if (expected == nullptr) {
    return nullptr;
  }
  if (n != n_expected) {
    PyErr_SetString(PyExc_ValueError, "params and expected differ in length");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(params[i])) {
      PyErr_SetString(PyExc_TypeError, "params must hold tensors");
      return nullptr;
    }
    const at::Tensor& grad = THPVariable_Unpack(params[i]).grad();
    const bool want_none = expected[i] == Py_None;
    if (!grad.defined()) {
      if (!want_none) {
        Py_RETURN_TRUE;
      }
      continue;
    }
    // The grad is the expected view only if it is the same TensorImpl (the same Python object).
    if (want_none || !THPVariable_Check(expected[i]) ||
        grad.unsafeGetTensorImpl() != THPVariable_Unpack(expected[i]).unsafeGetTensorImpl()) {
      Py_RETURN_TRUE;
    }
  }
  Py_RETURN_FALSE;
}

}  // namespace

PyMethodDef kBucketCheckMethods[] = {
    {"first_moved", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(first_moved)), METH_FASTCALL,
     "first_moved(params, views) -> index of the first parameter no longer in its view's storage, or -1"},
    {"grads_changed", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(grads_changed)), METH_FASTCALL,
     "grads_changed(params, expected) -> whether any .grad is not the expected object (None: no gradient)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fused_lesam
