"""ncnn runtime (its Python bindings) over a ``.param`` + ``.bin`` pair.

* Precision pinned: fp16/bf16 storage and arithmetic are switched off before the model is loaded
  (ncnn would otherwise pick fp16 by itself on CPUs that have it); INT8 layers of an INT8 model run
  in int8. ``describe()`` reports ncnn's options and the CPU features it saw.
* ncnn has no batch axis: a batch runs image by image, outputs stacked (``batch_loop``).
* Shapes: the input must be N x C x H x W with the channel count of the model; where the build
  recorded a fixed H, W (the Input layer's 0=w 1=h 2=c, written only when the model bakes its size
  into a Reshape), any other size is refused in one line.
* Output names: the build renames pnnx's ``out<i>`` blobs to ``out<i>_<output name>``; the order is
  the model's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...errors import CbamDeployError
from ...runners.base import Runner
from .exporter import NcnnParam, copy_out, generic_layers, input_mat, net_options, open_net, require_ncnn

_OUTPUT = re.compile(r"out(\d+)(?:_(.+))?$")


class NcnnRunner(Runner):
    backend = "ncnn"

    def __init__(self, param_path: str | Path, precision: str = "fp32", threads: int | None = None,
                 pinned: bool = True, extra_blobs: list[str] | None = None) -> None:
        """``pinned`` False: ncnn's own defaults (fp16 where the CPU has it): the pnnx-defaults peer.
        ``extra_blobs``: intermediate blobs returned as outputs too (gate maps)."""
        require_ncnn()
        param_path = Path(param_path)
        self.param_path = param_path
        self.bin_path = param_path.with_suffix(".bin")
        param = NcnnParam.read(param_path)  # read and checked once: ncnn is handed this text
        self.net = open_net(param_path, self.bin_path, threads, pinned, param)
        inputs, outputs = param.blob_names()
        if len(inputs) != 1:
            raise CbamDeployError(f"{param_path}: {len(inputs)} inputs; cbam-deploy runs ncnn models with one image input")
        self.input_blob = inputs[0]
        layer = next(la for la in param.layers if la.type == "Input")
        self.fixed_chw = tuple(layer.int(k) for k in (2, 1, 0)) if layer.get(0) is not None else None
        named = []
        for blob in outputs:
            match = _OUTPUT.match(blob)
            if match:
                named.append((int(match.group(1)), blob, match.group(2) or blob))
        if not named:
            raise CbamDeployError(f"{param_path}: no output blob named out<i> (not a pnnx conversion)")
        self.outputs = [(blob, name) for _, blob, name in sorted(named)]
        self.extra_blobs = list(extra_blobs or [])
        self.precision = precision
        self.pinned = pinned
        self.options = net_options(self.net)
        self.layers = param.counts()
        self.generic_layers = generic_layers(param)

    def _check(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise CbamDeployError(f"ncnn model {self.param_path.name} takes N x C x H x W images, got shape {batch.shape}")
        if self.fixed_chw is not None and tuple(batch.shape[1:]) != self.fixed_chw:
            raise CbamDeployError(f"ncnn model {self.param_path.name} was built for {'x'.join(map(str, self.fixed_chw))} "
                                  f"(its graph bakes that size in), got {'x'.join(map(str, batch.shape[1:]))}")
        return batch

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = self._check(batch)
        blobs = [blob for blob, _ in self.outputs] + self.extra_blobs
        per_image = []
        for image in batch:  # ncnn has no batch axis: one image at a time
            ex = self.net.create_extractor()
            ex.set_light_mode(len(blobs) < 2)  # light mode frees blobs once consumed: a later extract of one fails
            mat = input_mat(np.ascontiguousarray(image))
            if ex.input(self.input_blob, mat) != 0:
                raise CbamDeployError(f"ncnn refused the input (shape {image.shape})")
            found = {}
            for blob in blobs:
                rc, out = ex.extract(blob)
                if rc != 0:
                    raise CbamDeployError(f"ncnn could not compute {blob} for a {'x'.join(map(str, image.shape))} "
                                          "input (a size the model cannot take?)")
                found[blob] = copy_out(out, blob, image.shape)
            del mat, ex
            per_image.append(found)
        result = {name: np.stack([r[blob] for r in per_image]) for blob, name in self.outputs}
        for blob in self.extra_blobs:
            result[blob] = np.stack([r[blob] for r in per_image])
        return result

    def threads(self) -> int | None:
        return int(self.net.opt.num_threads)

    def _float_precision(self) -> str:
        """What ncnn's options, as the loaded net holds them, make it compute float layers in."""
        opts = self.options["options"]
        return "fp16" if opts["use_fp16_arithmetic"] or opts["use_fp16_storage"] else \
            "bf16" if opts["use_bf16_storage"] else "fp32"

    def computed_precision(self) -> str | None:
        return None if self.precision == "int8" else self._float_precision()

    def describe(self) -> dict:
        opts = self.options["options"]
        return {**super().describe(), "runtime": getattr(self, "runtime", None) or "ncnn",
                "compute_precision": self._float_precision() + (" (int8 layers in int8)" if self.precision == "int8" else ""),
                "pinned": self.pinned, "ncnn_options": opts, "cpu_support": self.options["cpu_support"],
                "batch_loop": "ncnn has no batch axis: a batch runs image by image",
                "ncnn_layers": self.layers, "generic_layers": self.generic_layers,
                "input_shape": "fixed " + "x".join(map(str, self.fixed_chw)) if self.fixed_chw else "any H, W"}
