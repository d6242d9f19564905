"""The explain page: draws what ``explain.explain_image`` computed for one image as PNG overlays
(Grad-CAM, each spatial gate over the input, each channel gate as a profile) and one self-contained
HTML page, plus the raw maps (``maps.npz``).

``explain_bundle`` is ``cbam-deploy explain``: it checks the arguments, computes, then writes. The
folder is written as one unit (staged beside it, then swapped in whole: an interrupted run leaves the
previous page as it was); the page embeds every image as a data: URI, so it can be mailed or
attached to a CI run on its own.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .bundle import Bundle, Preprocess
from .checks import check_existing_file, check_output_dir, shorten
from .errors import CbamDeployError
from .explain import TOP_K, Explanation, explain_image
from .fsutil import StagedFolder
from .models import CodeTrust
from .results import Result


class ExplainResult(Result):
    """The page and every file written (``page``, ``files``), the gates, the predictions, Grad-CAM, and per
    artifact its attention parity (``artifacts``); what was left out and why (``skipped``)."""

    command = "explain"

    @property
    def page(self) -> Path:
        return Path(self["page"])

    @property
    def artifacts(self) -> dict[str, dict]:
        return self["artifacts"]

    @property
    def passed(self) -> bool | None:
        """Whether every artifact's attention agrees with the reference's (None: none was compared);
        explain writes the page either way (its exit code is 0)."""
        verdicts = [row["attention"]["passed"] for row in self.artifacts.values() if row.get("attention")]
        return all(verdicts) if verdicts else None

    @property
    def exit_code(self) -> int:
        return 0
from .transaction import faultpoint

PAGE_NAME = "index.html"
MAPS_NAME = "maps.npz"
OUTLINE_MAX = 64  # inputs up to this side get their outline drawn over the maps
MIN_DISPLAY = 160  # small inputs (digits: 32 px) are upscaled, nearest, to at least this many pixels
OVERLAY_ALPHA = 0.55
COLORMAP = "turbo"


def explain_bundle(bundle_dir: str | Path, image_path: str | Path, artifacts: list[str] | None = None,
                   output_dir: str | Path | None = None, trust: CodeTrust | None = None,
                   reference=None) -> ExplainResult:
    """Explain one image with a bundle; returns what was found and every file written.

    ``artifacts``: names of artifacts whose format reads its gates (default: all of them in the bundle;
    others are listed under ``skipped``). ``output_dir``: default ``explain/<bundle folder name>/`` under the
    current folder. Result: ``page`` (the HTML), ``files`` (every file written), ``gates``,
    ``predictions`` {runner: top-5}, ``gradcam``, ``artifacts`` {name: {"attention": compare_maps(...),
    "files": {gate: png}, ...}}, ``skipped`` {name: reason}, ``notes``.
    """
    check_existing_file("--image", image_path)
    check_output_dir("--output", output_dir)
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)
    output_dir = output_folder(output_dir, bundle.directory)  # before any work
    faultpoint("explain-start")
    return write_page(bundle, explain_image(bundle, image_path, artifacts, trust, reference), output_dir)


def write_page(bundle: Bundle, found: Explanation, output_dir: Path) -> ExplainResult:
    """Draw ``found`` into ``output_dir`` (staged, then swapped in whole); the result ``explain_bundle`` returns."""
    bundle_dir, image_path, chw, key, label = bundle.directory, found.image_path, found.chw, found.key, found.label
    gates, kinds, rows, classifier = found.gates, found.kinds, found.rows, found.classifier
    reference_all, reference_maps, channel_maps = found.reference_all, found.reference_maps, found.channel_maps
    candidate_maps, candidate_profiles = found.candidate_maps, found.candidate_profiles
    gradcam, gradcam_map = found.gradcam, found.gradcam_map
    predictions, skipped, notes = found.predictions, found.skipped, found.notes
    stage = StagedFolder(output_dir, "explain")
    try:
        staged = stage.open()
    except OSError as exc:
        raise CbamDeployError(f"-o {output_dir}: cannot create the folder ({exc.strerror or exc})") from None
    with contextlib.closing(stage):  # removes the staging folder: the old page after a swap, or the unfinished one
        writer = _Writer(output_dir, staged)
        picture = _display_image(chw, bundle.input.preprocess)
        outline = _outline(chw, bundle.input.preprocess, picture.shape[0])

        writer.png("input.png", _render_image(picture))
        faultpoint("explain-render")
        if gradcam_map is not None:
            gradcam["file"] = writer.png("gradcam.png", _render_overlay(
                picture, _normalise(gradcam_map), (0.0, 1.0), smooth=True, label="Grad-CAM (relative)", outline=outline))
        spatial_files: dict[str, dict[str, str]] = {}
        for gate in gates:
            ref = reference_maps[gate][0, 0]
            scale = _scale_of(ref)
            spatial_files[gate] = {key: writer.png(f"spatial-{_slug(gate)}-{_slug(key)}.png",
                                                   _render_overlay(picture, ref, scale, outline=outline))}
            for name in rows:
                cand = candidate_maps[name].get(gate)
                if cand is not None and cand.size == ref.size:
                    file = writer.png(f"spatial-{_slug(gate)}-{_slug(name)}.png",
                                      _render_overlay(picture, cand.reshape(ref.shape), scale, outline=outline))
                    rows[name]["files"][gate] = file
                    spatial_files[gate][name] = file
        channel_files = {gate: writer.png(f"channel-{_slug(gate)}.png", _render_profile(profile[0]))
                         for gate, profile in channel_maps.items()}
        for name in rows:
            for gate, profile in candidate_profiles[name].items():
                if gate in channel_maps and profile.size == channel_maps[gate].size:
                    rows[name]["channel_files"][gate] = writer.png(f"channel-{_slug(gate)}-{_slug(name)}.png",
                                                                   _render_profile(profile[0]))

        arrays = {f"spatial/{key}/{g}": m[0, 0] for g, m in reference_maps.items()}
        arrays.update({f"spatial/{name}/{g}": m.reshape(reference_maps[g].shape[2:])
                       for name, maps in candidate_maps.items() for g, m in maps.items()
                       if g in reference_maps and m.size == reference_maps[g].size})
        arrays.update({f"channel/{key}/{g}": m[0] for g, m in channel_maps.items()})
        arrays.update({f"channel/{name}/{g}": m[0] for name, profiles in candidate_profiles.items()
                       for g, m in profiles.items() if g in channel_maps and m.size == channel_maps[g].size})
        if gradcam_map is not None:
            arrays["gradcam"] = gradcam_map
        arrays["input"] = chw
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        maps_file = writer.write(MAPS_NAME, buffer.getvalue())

        result = {
            "bundle": str(bundle_dir), "image": str(image_path), "output_dir": str(output_dir),
            "model": bundle.model.name, "reference": key, "reference_label": label, "classifier": classifier,
            "input_shape": list(chw.shape), "gates": gates, "gate_kinds": {g: kinds[g] for g in reference_all},
            "gate_shapes": {g: list(m.shape[2:]) for g, m in reference_maps.items()}, "channel_gates": list(channel_maps),
            "predictions": predictions, "gradcam": gradcam, "artifacts": rows, "skipped": skipped, "notes": notes,
            "maps": maps_file, "reference_files": {g: f[key] for g, f in spatial_files.items()},
            "channel_files": channel_files,
        }
        page = _page(result, writer, spatial_files, channel_files, {g: m[0, 0] for g, m in reference_maps.items()})
        result["page"] = writer.write(PAGE_NAME, page.encode("utf-8"))
        result["files"] = list(writer.files)
        faultpoint("explain-staged")
        try:
            stage.swap_in()  # the old folder or the new one, never a mix
        except OSError as exc:
            raise CbamDeployError(f"-o {output_dir}: cannot put the page in place ({exc.strerror or exc})") from None
        return ExplainResult(result)


def output_folder(output_dir: str | Path | None, bundle_dir: Path) -> Path:
    """Where the page goes (default ``explain/<bundle folder name>/``), refused when it is a folder of
    other files: explain replaces its folder as a whole, so it takes a new or empty folder, or one an
    earlier explain wrote."""
    output_dir = Path(output_dir) if output_dir is not None else Path("explain") / bundle_dir.resolve().name
    if output_dir.is_dir():
        names = set(os.listdir(output_dir))
        if names and not names & {PAGE_NAME, MAPS_NAME}:
            raise CbamDeployError(f"-o {output_dir} holds other files ({shorten(sorted(names)[0])}, ...): explain "
                                  "replaces its folder as a whole; give a new or empty folder, or an earlier page's")
    elif output_dir.exists() or output_dir.is_symlink():
        raise CbamDeployError(f"-o {output_dir} exists and is not a folder")
    return output_dir


# --- the figures -----------------------------------------------------------------------------------

def _display_image(chw: np.ndarray, preprocess: Preprocess, upscale: bool = True) -> np.ndarray:
    """The crop the model sees, back in [0, 1] RGB (H, W, 3), upscaled (nearest) to >= MIN_DISPLAY px."""
    mean = np.asarray(preprocess.mean, np.float32)[:, None, None]
    std = np.asarray(preprocess.std, np.float32)[:, None, None]
    scale = float(preprocess.scale) * 255.0
    rgb = np.clip((chw * std + mean) / scale, 0.0, 1.0).transpose(1, 2, 0)
    if not upscale:
        return rgb
    factor = max(1, math.ceil(MIN_DISPLAY / min(rgb.shape[:2])))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def _outline(chw: np.ndarray, preprocess: Preprocess, display_side: int):
    """For a small input (<= OUTLINE_MAX px, upscaled for display): (xs, ys, luminance, level) to draw
    the image's outline over the maps, where the colours of the map would hide it; None otherwise."""
    side = chw.shape[1]
    if side > OUTLINE_MAX or display_side <= side:
        return None
    factor = display_side / side
    luminance = _display_image(chw, preprocess, upscale=False).mean(axis=2)
    low, high = float(luminance.min()), float(luminance.max())
    if high - low < 0.1:
        return None
    centres = (np.arange(side) + 0.5) * factor - 0.5
    return centres, (np.arange(chw.shape[2]) + 0.5) * factor - 0.5, luminance, (low + high) / 2


def _upsample(values: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    """A map to the display's (H, W): nearest for gates (one block per gate cell, as the model has
    them), bilinear for an already smooth map."""
    height, width = size
    image = Image.fromarray(np.ascontiguousarray(values, np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.BILINEAR if smooth else Image.NEAREST), np.float32)


def _scale_of(reference: np.ndarray) -> tuple[float, float]:
    """The colour scale of one gate's row: the reference map's range (a constant map: +-0.05 around it)."""
    low, high = float(reference.min()), float(reference.max())
    if high - low < 1e-6:
        return max(0.0, low - 0.05), min(1.0, high + 0.05)
    return low, high


def _normalise(values: np.ndarray) -> np.ndarray:
    top = float(np.max(values)) if values.size else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _figure(width_px: int, height_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is heavy, and only figures need it
    from matplotlib.figure import Figure  # lazy: as above

    dpi = 100
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    return buffer.getvalue()


def _render_image(picture: np.ndarray) -> bytes:
    height, width = picture.shape[:2]
    figure = _figure(width, height)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(picture, interpolation="nearest")
    axes.set_axis_off()
    return _png(figure)


def _render_overlay(picture: np.ndarray, values: np.ndarray, scale: tuple[float, float], smooth: bool = False,
                    label: str | None = None, outline=None) -> bytes:
    """The image in grey with the map over it (colormap, alpha), a colour bar of ``scale``, and for a
    small input the image's outline (see ``_outline``)."""
    height, width = picture.shape[:2]
    bar = 58
    figure = _figure(width + bar, height)
    axes = figure.add_axes((0, 0, width / (width + bar), 1))
    axes.imshow(picture.mean(axis=2), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    shown = axes.imshow(_upsample(values, (height, width), smooth), cmap=COLORMAP, vmin=scale[0], vmax=scale[1],
                        alpha=OVERLAY_ALPHA, interpolation="nearest")
    if outline is not None:
        ys, xs, luminance, level = outline
        axes.contour(xs, ys, luminance, levels=[level], colors="white", linewidths=1.6)
        axes.contour(xs, ys, luminance, levels=[level], colors="black", linewidths=0.6)
        axes.set_xlim(-0.5, width - 0.5)
        axes.set_ylim(height - 0.5, -0.5)
    axes.set_axis_off()
    colorbar_axes = figure.add_axes(((width + 6) / (width + bar), 0.06, 10 / (width + bar), 0.88))
    colorbar = figure.colorbar(shown, cax=colorbar_axes)
    colorbar.ax.tick_params(labelsize=7, length=2, pad=1)
    colorbar.set_ticks(np.linspace(scale[0], scale[1], 3))
    colorbar.ax.set_yticklabels([_tick(v, scale) for v in np.linspace(scale[0], scale[1], 3)])
    if label:
        colorbar.set_label(label, fontsize=7)
    return _png(figure)


def _tick(value: float, scale: tuple[float, float]) -> str:
    span = scale[1] - scale[0]
    digits = 2 if span >= 0.1 else 3 if span >= 0.01 else 4
    return f"{value:.{digits}f}"


def _render_profile(values: np.ndarray) -> bytes:
    """A channel gate: one bar per channel (a line for wide layers), on the gate's (0, 1) range."""
    values = np.asarray(values, np.float32).ravel()
    figure = _figure(250, 150)
    axes = figure.add_axes((0.15, 0.22, 0.81, 0.7))
    channels = np.arange(len(values))
    if len(values) <= 256:
        axes.bar(channels, values, width=1.0, color="#3b6fb6", linewidth=0)
    else:
        axes.fill_between(channels, values, color="#3b6fb6", linewidth=0.5, step="mid")
    axes.set_xlim(-0.5, len(values) - 0.5)
    axes.set_ylim(0, 1)
    axes.set_yticks([0, 0.5, 1])
    axes.tick_params(labelsize=7, length=2)
    axes.set_xlabel(f"channel (C = {len(values)})", fontsize=7, labelpad=1)
    axes.set_ylabel("gate", fontsize=7, labelpad=1)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return _png(figure)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# --- writing ---------------------------------------------------------------------------------------

class _Writer:
    """Writes files into the staging folder, keeps their bytes for the page, lists them under the
    paths they will have once the folder is swapped in."""

    def __init__(self, folder: Path, staging: Path) -> None:
        self.folder = folder
        self.staging = staging
        self.files: list[str] = []
        self.data: dict[str, bytes] = {}

    def write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        try:
            (self.staging / name).write_bytes(data)
        except OSError as exc:
            raise CbamDeployError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.files.append(str(path))
        self.data[str(path)] = data
        return str(path)

    def png(self, name: str, data: bytes) -> str:
        return self.write(name, data)

    def uri(self, path: str) -> str:
        return "data:image/png;base64," + base64.b64encode(self.data[path]).decode("ascii")


# --- the page --------------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:20px 28px;color:#1d232b;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #d8dde3;padding-bottom:3px}
h3{font-size:14px;margin:14px 0 6px}.sub{color:#5a6573;margin:0 0 10px}code{font-size:12.5px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px;border-bottom:1px solid #e6e9ed;text-align:left}
th{background:#f4f6f8;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;padding:6px;border:1px solid #e1e5ea;border-radius:6px;background:#fff}
figure img{display:block}figcaption{font-size:12px;margin-top:4px;max-width:260px;font-variant-numeric:tabular-nums}
figcaption b{font-size:12.5px}.pass{color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}
.note{background:#fff8e1;border-left:3px solid #f0b400;padding:6px 10px;margin:8px 0;max-width:980px}
.muted{color:#6b7480}.preds{display:flex;gap:18px;flex-wrap:wrap}
"""


def _page(result: dict, writer: _Writer, spatial_files: dict, channel_files: dict, reference_maps: dict) -> str:
    e = html.escape
    label = result["reference"]
    runners = [label] + list(result["artifacts"])
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>explain {e(result['model'])}: {e(Path(result['image']).name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>What {e(result['model'])} sees: {e(Path(result['image']).name)}</h1>",
        f'<p class="sub">bundle <code>{e(result["bundle"])}</code> · input {e("x".join(map(str, result["input_shape"])))} '
        f"· reference <b>{e(label)}</b> · artifacts: {e(', '.join(result['artifacts']) or 'none')}</p>",
    ]
    for note in result["notes"]:
        parts.append(f'<div class="note">{e(note)}</div>')
    for name, reason in result["skipped"].items():
        parts.append(f'<div class="note">{e(name)} not shown: {e(reason)}</div>')

    # summary: one line per artifact
    if result["artifacts"]:
        parts.append("<h2>Attention parity against " + e(label) + "</h2>")
        parts.append("<table><tr><th>artifact</th><th>format</th><th>precision</th><th>top-1</th>"
                     "<th>worst gate correlation</th><th>worst top-10% IoU</th><th>worst channel cosine</th>"
                     "<th>worst channel overlap</th><th>needs</th><th>attention</th></tr>")
        for name, row in result["artifacts"].items():
            attention = row.get("attention") or {}
            needs = attention.get("thresholds", {})
            top1 = ("-" if "top1_agrees" not in row else
                    '<span class="pass">agrees</span>' if row["top1_agrees"] else '<span class="fail">differs</span>')
            verdict = ("-" if not attention else '<span class="pass">pass</span>' if attention["passed"]
                       else '<span class="fail">FAIL</span>')
            parts.append(
                f"<tr><td><b>{e(name)}</b></td><td>{e(row['format'])}</td><td>{e(row['precision'])}</td><td>{top1}</td>"
                f"<td class=num>{_fmt(attention.get('min_correlation'), 4)}</td>"
                f"<td class=num>{_fmt(attention.get('min_top_iou'), 3)}</td>"
                f"<td class=num>{_fmt(attention.get('min_channel_cosine'), 4)}</td>"
                f"<td class=num>{_fmt(attention.get('min_channel_overlap'), 3)}</td>"
                f"<td class=num>{_needs(needs)}</td><td>{verdict}</td></tr>")
        parts.append("</table>")

    # the input (always), Grad-CAM, predictions
    parts.append("<h2>Input, Grad-CAM and predictions</h2><div class='row'>")
    input_path = str(Path(result["output_dir"]) / "input.png")
    parts.append(_figure_html(writer.uri(input_path), "<b>input</b><br>the crop the model sees"))
    if result["gradcam"]:
        cam = result["gradcam"]
        parts.append(_figure_html(writer.uri(cam["file"]),
                                  f"<b>Grad-CAM</b> ({e(label)}), class {cam['target']}<br>captum LayerGradCam on "
                                  f"<code>{e(cam['layer'])}</code> ({'x'.join(map(str, cam['layer_shape']))}), "
                                  "upsampled bilinear; scaled to its maximum"))
    if result["predictions"]:
        parts.append("<div class='preds'>")
        top = result["predictions"][label][0]["class"]
        for runner in runners:
            preds = result["predictions"].get(runner)
            if not preds:
                continue
            parts.append(f"<table><tr><th colspan=2>{e(runner)}</th></tr>")
            for p in preds:
                mark = " <b>*</b>" if p["class"] == top else ""
                parts.append(f"<tr><td>class {p['class']}{mark}</td><td class=num>{p['probability'] * 100:.2f}%</td></tr>")
            parts.append("</table>")
        parts.append("</div>")
    parts.append("</div>")
    if result["predictions"]:
        parts.append(f'<p class="muted">top-{TOP_K} by softmax of the logits; <b>*</b> marks the '
                     f"reference's top class.</p>")

    # stages
    if result["gates"]:
        parts.append("<h2>Spatial attention per stage</h2>")
        parts.append('<p class="muted">Each spatial gate (the sigmoid map, one cell per feature-map position, '
                     "nearest-upscaled; a joint gate as its mean over channels) over the input; every map of a row shares the reference map's colour "
                     "scale. Under each artifact: Pearson correlation with the reference map, IoU of the "
                     "top-10% regions, largest absolute difference.</p>")
        for gate in result["gates"]:
            stage = gate.split(".")[0]
            ref_path = spatial_files[gate][label]
            parts.append(f"<h3>{e(stage)} · <code>{e(gate)}</code></h3><div class='row'>")
            size = "x".join(map(str, result["gate_shapes"][gate]))
            low, high = float(reference_maps[gate].min()), float(reference_maps[gate].max())
            values = f"constant {low:.4f}" if high - low < 1e-6 else f"{low:.4f} to {high:.4f}"
            parts.append(_figure_html(writer.uri(ref_path), f"<b>{e(label)}</b><br>{size} map, {values}"))
            for name, row in result["artifacts"].items():
                file = row["files"].get(gate)
                stage_parity = (row.get("attention") or {}).get("gates", {}).get(gate, {})
                if not file or not stage_parity.get("found"):
                    parts.append(f"<figure><figcaption><b>{e(name)}</b><br>"
                                 "<span class=fail>gate not found in the artifact</span></figcaption></figure>")
                    continue
                parts.append(_figure_html(writer.uri(file), f"<b>{e(name)}</b><br>" + _parity_caption(
                    stage_parity, row["attention"]["thresholds"])))
            parts.append("</div>")
    if channel_files:
        parts.append("<h2>Channel gates</h2>")
        parts.append('<p class="muted">Each channel gate as a profile (one bar per channel, on the gate\'s 0..1 '
                     "range). Under each artifact: cosine of the profiles and the share of its top-k channels "
                     "among the reference's top k.</p>")
        for gate, file in channel_files.items():
            parts.append(f"<h3><code>{e(gate)}</code></h3><div class='row'>")
            parts.append(_figure_html(writer.uri(file), f"<b>{e(label)}</b>"))
            for name, row in result["artifacts"].items():
                stage_parity = (row.get("attention") or {}).get("gates", {}).get(gate, {})
                artifact_file = row.get("channel_files", {}).get(gate)
                if not artifact_file or not stage_parity.get("found"):
                    parts.append(f"<figure><figcaption><b>{e(name)}</b><br>"
                                 "<span class=fail>gate not found in the artifact</span></figcaption></figure>")
                    continue
                thresholds = row["attention"]["thresholds"]
                ok_cos = stage_parity["cosine"] >= thresholds["min_channel_cosine"]
                ok_top = stage_parity["top_overlap"] >= thresholds["min_channel_overlap"]
                top_class = "muted" if stage_parity.get("flat") else "pass" if ok_top else "fail"
                caption = (f'<b>{e(name)}</b><br><span class="{"pass" if ok_cos else "fail"}">cosine '
                           f'{stage_parity["cosine"]:.4f}</span> · <span class="{top_class}">'
                           f'top-k {stage_parity["top_overlap"]:.2f}'
                           f'{" (flat: not judged)" if stage_parity.get("flat") else ""}</span>')
                parts.append(_figure_html(writer.uri(artifact_file), caption))
            parts.append("</div>")
    parts.append(f'<p class="muted">made by cbam-deploy explain · every image is embedded in this page · raw maps: '
                 f"{e(Path(result['maps']).name)}</p></body></html>")
    return "\n".join(parts)


def _figure_html(uri: str, caption: str) -> str:
    return f'<figure><img alt="" src="{uri}"><figcaption>{caption}</figcaption></figure>'


def _parity_caption(stage: dict, thresholds: dict) -> str:
    if stage.get("flat"):  # the map varies less than the artifact's error: judged on its cosine alone
        ok = stage["map_cosine"] >= thresholds["min_channel_cosine"]
        return (f'<span class="{"pass" if ok else "fail"}">cosine {stage["map_cosine"]:.4f}</span> · '
                f'<span class="muted">flat map: corr and IoU not judged</span><br>max |Δ| {stage["max_abs_err"]:.2e}')
    ok_corr = stage["correlation"] >= thresholds["min_correlation"]
    ok_iou = stage["top_iou"] >= thresholds["min_top_iou"]
    corr = f'<span class="{"pass" if ok_corr else "fail"}">corr {stage["correlation"]:.4f}</span>'
    iou = f'<span class="{"pass" if ok_iou else "fail"}">IoU {stage["top_iou"]:.3f}</span>'
    return f"{corr} · {iou}<br>max |Δ| {stage['max_abs_err']:.2e}"


def _needs(thresholds: dict) -> str:
    if not thresholds:
        return "-"
    return f"≥ {thresholds['min_correlation']} / ≥ {thresholds['min_top_iou']}"


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
