"""Calibration sources: image folders (formats, modes, unreadable files), arrays, synthetic."""

import numpy as np
import pytest
from PIL import Image

from cbam_deploy.data import load_calibration, preprocess_image
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.export_job import make_input_spec

SPEC = make_input_spec(32)


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "deep").mkdir(parents=True)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a" / "one.jpg")
    Image.fromarray(rgb).save(tmp_path / "a" / "deep" / "two.PNG")
    Image.fromarray(rgb[..., 0], mode="L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "b.bmp")
    Image.fromarray(rgb).save(tmp_path / "c.webp")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_folder_reads_every_format_and_counts_unreadable(tmp_path):
    data = load_calibration(str(_folder(tmp_path)), SPEC, size=100)
    assert data.inputs.shape == (7, 3, 32, 32) and data.inputs.dtype == np.float32
    assert data.skipped == 1 and data.total_found == 8 and np.isfinite(data.inputs).all()
    assert data.describe()["skipped_unreadable"] == 1


def test_sampling_is_seeded(tmp_path):
    folder = _folder(tmp_path)
    a = load_calibration(str(folder), SPEC, size=3, seed=0)
    b = load_calibration(str(folder), SPEC, size=3, seed=0)
    c = load_calibration(str(folder), SPEC, size=3, seed=5)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.inputs, b.inputs)
    assert a.fingerprint != c.fingerprint


def test_preprocessing_follows_the_manifest():
    spec = make_input_spec(224)
    image = Image.new("RGB", (400, 300), (255, 0, 128))
    array = preprocess_image(image, spec)
    assert array.shape == (3, 224, 224)
    expected = (np.array([1.0, 0.0, 128 / 255]) - np.array(spec["preprocess"]["mean"])) / np.array(spec["preprocess"]["std"])
    np.testing.assert_allclose(array[:, 100, 100], expected, rtol=1e-5)
    assert spec["preprocess"]["resize_shorter"] == 256


def test_empty_and_unreadable_folders(tmp_path):
    with pytest.raises(CbamDeployError, match="holds no images"):
        load_calibration(str(tmp_path), SPEC)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(CbamDeployError, match="none of its 1 image files could be read"):
        load_calibration(str(tmp_path), SPEC)
    with pytest.raises(CbamDeployError, match="does not exist"):
        load_calibration(str(tmp_path / "missing"), SPEC)


def test_arrays(tmp_path):
    good = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "good.npy", good)
    data = load_calibration(str(tmp_path / "good.npy"), SPEC, size=4)
    assert data.inputs.shape == (4, 3, 32, 32) and data.kind == "arrays"
    images = np.random.default_rng(0).integers(0, 255, (6, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", images=images)
    assert load_calibration(str(tmp_path / "imgs.npz"), SPEC).inputs.shape == (6, 3, 32, 32)
    np.save(tmp_path / "wrong.npy", good[:, :, :16])
    with pytest.raises(CbamDeployError, match="must be preprocessed NCHW"):
        load_calibration(str(tmp_path / "wrong.npy"), SPEC)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(CbamDeployError, match="NaN"):
        load_calibration(str(tmp_path / "nan.npy"), SPEC)
    np.save(tmp_path / "flat.npy", good.reshape(10, -1))
    with pytest.raises(CbamDeployError, match="4-D"):
        load_calibration(str(tmp_path / "flat.npy"), SPEC)
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CbamDeployError, match="cannot read"):
        load_calibration(str(tmp_path / "corrupt.npy"), SPEC)


def test_synthetic_is_only_by_name_and_marked():
    data = load_calibration("synthetic", SPEC, size=5)
    assert data.inputs.shape == (5, 3, 32, 32) and data.describe()["fit_for_production"] is False
