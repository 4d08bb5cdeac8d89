"""qmoe and ONNX: ``com.microsoft::QMoE`` models in, out, and ONNX Runtime
sessions whose QMoE nodes run on qmoe.

* :func:`load` -- every QMoE (and float MoE) node of a model as a
  :class:`qmoe.Layer`.
* :func:`export` -- write qmoe-style layer dicts as a QMoE model (raw layout)
  that ONNX Runtime's CPU EP runs.
* :func:`offload` -- move every QMoE/MoE node's weights of a model into a
  qmoe file and replace the node by a call into qmoe.
* :func:`session` -- an ``onnxruntime.InferenceSession`` for an offloaded
  model, its layers prepacked once.

``python -m qmoe.onnx offload MODEL.onnx -o OUT.onnx`` is the command-line
form of :func:`offload`. onnx (and, for sessions, onnxruntime and
onnxruntime-extensions) are imported only when these functions run, so
``import qmoe`` never needs them.
"""

from __future__ import annotations

from ._export import export
from ._load import load
from ._offload import offload
from ._session import session

__all__ = ["load", "export", "offload", "session"]
