"""ONNX for the encoders' models (text, token and image classification): export with torch's exporter (torch.export,
dynamic axes), run with ONNX Runtime behind the same call the predictors make of a transformers model, and int8
dynamic quantisation.

    export_onnx(model, {"input_ids": ids, "attention_mask": mask}, {"input_ids": {0: "batch", 1: "sequence"}, ...}, path)
    predictor.model = OnnxModel(path, config=predictor.model.config)   # predict / serve through ONNX Runtime

Nothing here imports onnx or onnxruntime at module level.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from tuneforge.errors import TuneforgeError


class OnnxExportError(TuneforgeError):
    """The model cannot be exported to ONNX, or the export does not match it."""


class _Logits(torch.nn.Module):
    """model(**inputs).logits with positional inputs: what the exporter traces."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).logits


def export_onnx(model, example: dict[str, torch.Tensor], dynamic: dict[str, dict[int, str]], path: Path) -> None:
    """Export `model(**example).logits` to `path` (one file, weights inside), with the axes `dynamic` names
    (e.g. batch, sequence) left free. fp32, on the CPU."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise OnnxExportError("ONNX export needs the onnx, onnxscript and onnxruntime packages, which are not installed",
                              fix="pip install 'tuneforge[export]'") from None
    names = list(example)
    dims: dict[str, torch.export.Dim] = {}
    shapes = tuple({axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in dynamic.get(n, {}).items()}
                   for n in names)
    module = _Logits(model.float().cpu().eval(), names).eval()
    quiet = io.StringIO()
    onnx_log = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping ..." x4
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            # forward(*args): the shapes of the one varargs parameter, a tuple of one spec per input
            torch.onnx.export(module, tuple(example[n].cpu() for n in names), str(path), input_names=names,
                              output_names=["logits"], dynamic_shapes=(shapes,), dynamo=True, optimize=True,
                              external_data=False, verbose=False)
        except Exception as err:
            raise OnnxExportError(f"torch could not export {type(model).__name__} to ONNX: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}"[:800],
                                  fix="report the model's architecture; serve it with `tuneforge serve` instead") from None
        finally:
            onnx_log.setLevel(level)


class OnnxModel:
    """An ONNX file behind the call the predictors make of a transformers model: `model(**inputs).logits` (a
    torch tensor), `.eval()`, `.to()`, `.config`. CPU execution provider; inputs the graph lacks are ignored."""

    def __init__(self, path: Path, config=None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxExportError("serving ONNX needs onnxruntime, which is not installed",
                                  fix="pip install 'tuneforge[export]'") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.config = config
        self.device = torch.device("cpu")

    def __call__(self, **inputs) -> SimpleNamespace:
        feed = {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in self.input_names}
        (logits,) = self.session.run(["logits"], feed)
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def eval(self) -> "OnnxModel":
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self

    def parameters(self):
        yield torch.zeros(0)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the weights of MatMul/Gemm, per output channel (activations quantised at run
    time): ONNX Runtime's quantize_dynamic, after its pre-processing (shape inference)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            source = pre
        except Exception:  # pre-processing is an optimisation: quantise the graph as it is
            source = src
        # per channel: MiniLM's test labels agree 97.5% with fp32's, against 93.2% per tensor (the demo, 1,275 rows)
        quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=True)
    pre.unlink(missing_ok=True)
