"""Medical formats on ``--data``: DICOM (pydicom's bundled sample files and files written here), NIfTI (volumes
with known affines), CSV manifests, window options, patient-level splits, bad input, and an encode end to end."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pydicom = pytest.importorskip("pydicom")  # declared dependencies; importorskip only gives a clearer failure
nib = pytest.importorskip("nibabel")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from msd_fast.data import (DataError, WINDOW_PRESETS, load_dataset, split_clients,  # noqa: E402
                           train_test_split)
from msd_fast.data import dicom as dicom_module  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pydicom's bundled test files, read from disk: get_testdata_file would try to download the ones not shipped
SAMPLES = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
CR_MONOCHROME1 = os.path.join(SAMPLES, "dicomdirtests", "77654033", "CR1", "6154")


def sample(name: str) -> str:
    path = os.path.join(SAMPLES, name)
    assert os.path.exists(path), f"pydicom no longer ships {name}"
    return path


def linear_exact(values, center, width):
    """DICOM LINEAR_EXACT by hand: 255 * clip((x - c) / w + 0.5, 0, 1), rounded half up."""
    return np.floor(np.clip((np.asarray(values, np.float64) - center) / width + 0.5, 0, 1) * 255 + 0.5).astype(
        np.uint8)


def linear(values, center, width):
    """DICOM's default LINEAR VOI function (PS3.3 C.11.2.1.2.1) by hand."""
    x = np.asarray(values, np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0, np.where(x > center - 0.5 + (width - 1) / 2, 255, y))
    return np.floor(y + 0.5).astype(np.uint8)


def write_dicom(path, pixels, *, photometric="MONOCHROME2", slope=None, intercept=None, window=None,
                patient="P-TEST", study=None, modality="CT"):
    """A minimal CT-like DICOM file (explicit VR little endian) holding int16 ``pixels`` ``[H, W]`` or
    ``[frames, H, W]``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.set_pixel_data(np.asarray(pixels, dtype=np.int16), "MONOCHROME2", 16)
    ds.PhotometricInterpretation = photometric
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path, volume, affine, *, slope=None, inter=None):
    image = nib.Nifti1Image(np.asarray(volume), np.asarray(affine, dtype=np.float64))
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, str(path))
    return str(path)


def gray(images):
    return images.to_tensor()[:, 0].numpy()


# ---- windows --------------------------------------------------------------------------------------------------------

def test_window_functions_against_hand_math():
    from msd_fast.data.window import Window, parse_window

    x = np.array([-2000.0, -1350.0, -600.0, 149.0, 151.0, np.nan, np.inf, -np.inf])
    # NaN -> 0 (black), +inf -> 255, -inf -> 0
    np.testing.assert_array_equal(parse_window("lung").apply(x), np.r_[linear_exact(x[:5], -600, 1500), 0, 255, 0])
    np.testing.assert_array_equal(linear_exact(x[:5], -600, 1500), [0, 0, 128, 255, 255])
    assert parse_window("LUNG") == parse_window((-600, 1500)) == parse_window(" -600 , 1500 ") == Window(-600, 1500)
    sigmoid = Window(40, 80, "SIGMOID").apply(np.array([40.0, 80.0, -1e3, -1e9]))
    np.testing.assert_array_equal(sigmoid, np.r_[np.floor(255 / (1 + np.exp(-4 * (np.array([0, 40, -1e3 - 40]) / 80)))
                                                          + 0.5).astype(np.uint8), 0])
    np.testing.assert_array_equal(Window(10, 1, "LINEAR").apply(np.array([9.5, 9.6])), [0, 255])
    assert parse_window(None) is None and parse_window("percentile") == "percentile"


# ---- DICOM ---------------------------------------------------------------------------------------------------------

def test_ct_small_is_rescaled_to_hounsfield_units_then_windowed():
    path = sample("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    hu = ds.pixel_array.astype(np.float64) * 1.0 - 1024.0
    for window, (center, width) in (("40,400", (40.0, 400.0)), ("lung", WINDOW_PRESETS["lung"]),
                                    ((-100, 1000), (-100.0, 1000.0))):
        images = load_dataset(path, window=window)
        assert images.geometry == (1, 128, 128) and len(images) == 1
        np.testing.assert_array_equal(gray(images)[0], linear_exact(hu, center, width))
    # the same through the --data option syntax
    np.testing.assert_array_equal(gray(load_dataset(f"{path}?window=bone")),
                                  linear_exact(hu, *WINDOW_PRESETS["bone"])[None])
    assert load_dataset(path).patient_ids.tolist() == ["1CT1"]
    assert load_dataset(path).study_ids.tolist() == [str(ds.StudyInstanceUID)]


def test_slope_intercept_of_a_written_file_and_the_default_percentile_window(tmp_path):
    raw = np.arange(-50, 50, dtype=np.int16).reshape(10, 10)
    path = write_dicom(tmp_path / "ct.dcm", raw, slope=2.5, intercept=-1000)
    hu = raw * 2.5 - 1000
    np.testing.assert_array_equal(gray(load_dataset(str(path), window="-1000,100"))[0],
                                  linear_exact(hu, -1000, 100))
    low, high = np.percentile(hu, (0.5, 99.5))  # no window tags: the file's robust percentile window
    np.testing.assert_array_equal(gray(load_dataset(str(path)))[0], linear_exact(hu, (low + high) / 2, high - low))


def test_mr_small_uses_its_window_tags_with_the_linear_function():
    path = sample("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert "RescaleSlope" not in ds
    np.testing.assert_array_equal(gray(load_dataset(path))[0], linear(ds.pixel_array, center, width))
    with pytest.warns(UserWarning, match="preset 'lung' is in Hounsfield units.*MR"):
        load_dataset(path, window="lung")
    # RLE lossless (decoded by pydicom itself) gives the same image
    np.testing.assert_array_equal(gray(load_dataset(sample("MR_small_RLE.dcm"))), gray(load_dataset(path)))


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    raw = np.arange(64, dtype=np.int16).reshape(8, 8) * 10
    normal = write_dicom(tmp_path / "m2.dcm", raw, window=(300, 400))
    inverted = write_dicom(tmp_path / "m1.dcm", raw, window=(300, 400), photometric="MONOCHROME1")
    a, b = gray(load_dataset(str(normal)))[0], gray(load_dataset(str(inverted)))[0]
    np.testing.assert_array_equal(a, linear(raw, 300, 400))
    np.testing.assert_array_equal(b, 255 - a)
    # pydicom's MONOCHROME1 CR sample: slope/intercept, its window tags, then inverted
    ds = pydicom.dcmread(CR_MONOCHROME1)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = 255 - linear(values, float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_array_equal(gray(load_dataset(CR_MONOCHROME1))[0], expected)


def test_multi_frame_files_give_one_image_per_frame(tmp_path):
    frames = np.stack([np.full((6, 8), 100 * f, dtype=np.int16) + np.arange(8, dtype=np.int16) for f in range(5)])
    path = write_dicom(tmp_path / "cine.dcm", frames, slope=1, intercept=0)
    images = load_dataset(str(path), window="200,400")
    assert len(images) == 5 and images.geometry == (1, 6, 8)
    np.testing.assert_array_equal(gray(images), linear_exact(frames, 200, 400))
    # a frame read alone (out of order) is the same frame
    np.testing.assert_array_equal(next(images.batches(1, [3]))[0, 0].numpy(), linear_exact(frames[3], 200, 400))
    # pydicom's 15-frame RT dose: one percentile window over all frames of the file
    ds = pydicom.dcmread(sample("rtdose.dcm"))
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1)
    low, high = np.percentile(values, (0.5, 99.5))
    dose = load_dataset(sample("rtdose.dcm"))
    assert len(dose) == 15
    np.testing.assert_array_equal(gray(dose), linear_exact(values, (low + high) / 2, high - low))


def test_enhanced_multi_frame_uses_per_frame_rescale_and_windows(tmp_path):
    frames = np.stack([np.arange(16, dtype=np.int16).reshape(4, 4) * (f + 1) for f in range(3)])
    path = write_dicom(tmp_path / "enhanced.dcm", frames)
    ds = pydicom.dcmread(path)
    shared, transform = Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2, -10
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for f in range(3):
        voi, item = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = 10 * (f + 1), 20 * (f + 1)
        item.FrameVOILUTSequence = [voi]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(path)
    values = frames * 2.0 - 10
    expected = np.stack([linear(values[f], 10 * (f + 1), 20 * (f + 1)) for f in range(3)])
    np.testing.assert_array_equal(gray(load_dataset(str(path))), expected)
    np.testing.assert_array_equal(gray(load_dataset(str(path), window="0,50")), linear_exact(values, 0, 50))


def test_colour_dicom_multi_frame_ybr_is_rgb():
    images = load_dataset(sample("examples_ybr_color.dcm"))
    assert len(images) == 30 and images.geometry == (3, 240, 320)
    first = next(images.batches(2))
    assert first.dtype == torch.uint8 and first.float().std() > 10
    with pytest.raises(DataError, match="colour.*monochrome"):
        load_dataset(sample("examples_ybr_color.dcm"), window="lung")


def test_compressed_syntax_without_decoder_is_one_line_naming_the_packages():
    path = sample("MR_small_jpeg_ls_lossless.dcm")
    decoder = get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if decoder.is_available:  # a JPEG-LS plugin is installed here: the file must then decode like the original
        np.testing.assert_array_equal(gray(load_dataset(path)), gray(load_dataset(sample("MR_small.dcm"))))
        return
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert "\n" not in message and path in message and "JPEG-LS" in message
    assert all(need.split(" - ")[0] in message for need in decoder.missing_dependencies)


def test_dicom_folder_is_read_lazily_and_keeps_patients(tmp_path, monkeypatch):
    for patient in ("A", "B"):
        for i in range(3):
            write_dicom(tmp_path / f"{patient}{i}", np.full((4, 4), i, np.int16), patient=f"PAT-{patient}")
    (tmp_path / "notes.txt").write_text("not DICOM")
    decoded = []
    real = dicom_module.decode_dicom
    monkeypatch.setattr(dicom_module, "decode_dicom", lambda path, window: decoded.append(path) or real(path, window))
    images = load_dataset(str(tmp_path), window="0,10")  # files without .dcm: found by the DICM marker
    assert len(images) == 6 and decoded == []  # headers only
    assert images.patient_ids.tolist() == ["PAT-A"] * 3 + ["PAT-B"] * 3
    assert len(set(images.groups)) == 2
    batch = next(images.batches(2, [4, 1]))
    assert decoded == [str(tmp_path / "B1"), str(tmp_path / "A1")]
    np.testing.assert_array_equal(batch[:, 0, 0, 0].numpy(), linear_exact([1, 1], 0, 10))
    assert "PAT-A" not in repr(images)


def test_dicom_and_nifti_folders_with_split_sub_folders(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        os.makedirs(tmp_path / "ct" / split)
        for i in range(count):
            write_dicom(tmp_path / "ct" / split / f"{i}.dcm", np.zeros((4, 4), np.int16))
        os.makedirs(tmp_path / "mr" / split)
        write_nifti(tmp_path / "mr" / split / "v.nii", np.zeros((4, 4, count), np.float32), np.eye(4))
    for kind in ("ct", "mr"):
        assert len(load_dataset(str(tmp_path / kind))) == 3
        assert len(load_dataset(str(tmp_path / kind), split="test")) == 2
        with pytest.raises(DataError, match="no 'val' folder"):
            load_dataset(str(tmp_path / kind), split="val")


def test_pydicom_sample_folder_skips_objects_without_pixels_and_splits_by_patient():
    with pytest.warns(UserWarning, match="without pixel data"):
        images = load_dataset(os.path.join(SAMPLES, "dicomdirtests"))
    assert len(images) == 31 and set(images.patient_ids) == {"77654033", "98890234"}
    train, test = train_test_split(len(images), 0.3, groups=images.groups)
    assert not set(images.groups[train.numpy()]) & set(images.groups[test.numpy()])


# ---- NIfTI ---------------------------------------------------------------------------------------------------------

def test_nifti_reorientation_to_ras_against_hand_computed_flips(tmp_path):
    X, Y, Z = 4, 3, 5
    volume = np.arange(X * Y * Z, dtype=np.float32).reshape(X, Y, Z)
    window = f"{X * Y * Z / 2},{X * Y * Z}"  # every value inside the window: distinct values stay distinct
    C, W = X * Y * Z / 2, X * Y * Z
    # LAS: array axis 0 points to the patient's left, so RAS flips it: canonical[x, y, z] = volume[X-1-x, y, z]
    las = write_nifti(tmp_path / "las.nii.gz", volume, np.diag([-2.0, 1.0, 1.5, 1.0]))
    images = load_dataset(las, window=window)
    assert len(images) == Z and images.geometry == (1, Y, X)
    expected = np.array([[[volume[X - 1 - (X - 1 - c), Y - 1 - r, k] for c in range(X)] for r in range(Y)]
                         for k in range(Z)])  # axial slice[r, c] = canonical[X-1-c, Y-1-r, k]
    np.testing.assert_array_equal(gray(images), linear_exact(expected, C, W))
    # permuted axes: array axis 0 -> S, 1 -> R, 2 -> A, so canonical[x, y, z] = volume[z, x, y]
    permuted = np.arange(Z * X * Y, dtype=np.float32).reshape(Z, X, Y)
    affine = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    path = write_nifti(tmp_path / "sra.nii", permuted, affine)
    canonical = lambda x, y, z: permuted[z, x, y]  # noqa: E731
    axial = np.array([[[canonical(X - 1 - c, Y - 1 - r, k) for c in range(X)] for r in range(Y)] for k in range(Z)])
    coronal = np.array([[[canonical(X - 1 - c, j, Z - 1 - r) for c in range(X)] for r in range(Z)] for j in range(Y)])
    sagittal = np.array([[[canonical(i, Y - 1 - c, Z - 1 - r) for c in range(Y)] for r in range(Z)]
                         for i in range(X)])
    for axis, want in (("axial", axial), ("coronal", coronal), ("sagittal", sagittal)):
        images = load_dataset(f"{path}?window={window}&axis={axis}")
        assert images.geometry == (1,) + want.shape[1:] and len(images) == len(want), axis
        np.testing.assert_array_equal(gray(images), linear_exact(want, C, W), err_msg=axis)


def test_nifti_scaling_percentile_default_and_volume_groups(tmp_path):
    raw = np.arange(6 * 6 * 4, dtype=np.int16).reshape(6, 6, 4)
    path = write_nifti(tmp_path / "scaled.nii.gz", raw, np.eye(4), slope=2.0, inter=-100.0)
    values = raw * 2.0 - 100.0
    low, high = np.percentile(values, (0.5, 99.5))
    images = load_dataset(path)
    expected = np.stack([values[::-1, ::-1, k].T for k in range(4)])
    np.testing.assert_array_equal(gray(images), linear_exact(expected, (low + high) / 2, high - low))
    np.testing.assert_array_equal(gray(load_dataset(path, window="-100,50")), linear_exact(expected, -100, 50))
    assert images.patient_ids is None and set(images.groups) == {f"volume:{path}"}
    # a trailing dimension of 1 is a 3-D volume
    assert len(load_dataset(write_nifti(tmp_path / "t.nii", raw[..., None], np.eye(4)))) == 4


# ---- CSV manifests -------------------------------------------------------------------------------------------------

def _manifest_folder(tmp_path):
    """8x8 images of four kinds and a manifest listing them with labels and patients."""
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "photo.png")
    write_dicom(tmp_path / "single.dcm", np.zeros((8, 8), np.int16), patient="FROM-TAG-1")
    os.makedirs(tmp_path / "series")
    for i in range(2):
        write_dicom(tmp_path / "series" / f"IM{i}", np.full((8, 8), i, np.int16), patient="FROM-TAG-2")
    write_nifti(tmp_path / "vol.nii.gz", np.random.default_rng(0).normal(size=(8, 8, 3)).astype(np.float32),
                np.eye(4))
    (tmp_path / "scans.csv").write_text("path,label,patient_id,notes\n"
                                        "photo.png,normal,P1,x\n"
                                        "single.dcm,tumour,,\n"
                                        f"{tmp_path / 'series'},tumour,P2,\n"
                                        "vol.nii.gz,normal,P1,\n")
    return tmp_path / "scans.csv"


def test_manifest_mixes_formats_with_row_labels_and_patients(tmp_path):
    images = load_dataset(str(_manifest_folder(tmp_path)))
    assert len(images) == 1 + 1 + 2 + 3 and images.geometry == (1, 8, 8)
    assert images.class_names == ["normal", "tumour"]
    assert images.labels.tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert images.patient_ids.tolist() == ["P1", "FROM-TAG-1", "P2", "P2", "P1", "P1", "P1"]
    assert len(set(images.groups)) == 3  # P1 (photo + volume), the tag's patient, P2
    pixels = images.to_tensor()
    assert (pixels[0] == 77).all() and pixels.dtype == torch.uint8
    integer = tmp_path / "integer.csv"
    integer.write_text("PATH , Label\nphoto.png,3\nsingle.dcm,0\n")
    labelled = load_dataset(str(integer))
    assert labelled.labels.tolist() == [3, 0] and labelled.class_names is None
    (tmp_path / "unlabeled.csv").write_text("path\nvol.nii.gz\n")
    assert load_dataset(str(tmp_path / "unlabeled.csv") + "?axis=coronal").labels is None


@pytest.mark.parametrize("rows, problem", [
    ("path,label\nmissing.png,a\n", "line 2: missing.png: no such file"),
    ("path,label\nphoto.png,-1\n", "line 2: bad label '-1'"),
    ("path,label\nphoto.png,a\nphoto.png,2\n", "line 3: bad label '2'.*mixes"),
    ("path,label\nphoto.png,\n", "line 2: empty label"),
    ("file,label\nphoto.png,a\n", "no 'path' column"),
    ("path,label\n", "lists no files"),
    ("path,label\nscans.csv,a\n", "unsupported file"),
])
def test_bad_manifests_name_the_row_and_the_problem(tmp_path, rows, problem):
    _manifest_folder(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(rows)
    with pytest.raises(DataError, match=problem) as caught:
        load_dataset(str(bad))
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


# ---- patient-level splits ------------------------------------------------------------------------------------------

def test_patient_level_splits_never_share_a_patient():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 9, 60)
    groups = np.repeat([f"patient-{i}" for i in range(60)], sizes)
    labels = np.repeat(np.arange(60) % 3, sizes)
    for seed in range(5):
        train, test = train_test_split(labels, 0.25, seed=seed, groups=groups)
        assert not set(groups[train.numpy()]) & set(groups[test.numpy()])
        assert len(train) + len(test) == len(labels) and not set(train.tolist()) & set(test.tolist())
        assert abs(len(test) - 0.25 * len(labels)) <= 8  # at most one patient away from the target
        for cls in range(3):  # stratified as far as whole patients allow
            share = np.mean(labels[test.numpy()] == cls)
            assert abs(share - 1 / 3) < 0.1
        for alpha in (None, 0.3):
            parts = split_clients(labels, 4, alpha=alpha, seed=seed, groups=groups)
            owners = [set(groups[p.numpy()]) for p in parts]
            assert all(len(p) for p in parts) and sum(len(p) for p in parts) == len(labels)
            assert all(not owners[i] & owners[j] for i in range(4) for j in range(i + 1, 4))
    iid = split_clients(len(labels), 4, groups=groups)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 8
    # without groups nothing changes: the image-level split
    assert torch.equal(train_test_split(labels, 0.25)[1], train_test_split(labels, 0.25, groups=None)[1])
    with pytest.raises(ValueError, match="two groups"):
        train_test_split(labels, 0.25, groups=np.full(len(labels), "one"))
    with pytest.raises(ValueError, match="groups"):
        split_clients(labels, 61, groups=groups)


def test_cli_held_out_split_encode_clients_and_demo_keep_patients_apart(tmp_path):
    from msd_fast.cli.downstream import load_labelled_data
    from msd_fast.client.encode import client_subset
    from msd_fast.evaluation.demo import Demo, DemoConfig

    for p in range(12):
        for i in range(1 + p % 3):
            write_dicom(tmp_path / f"p{p}_{i}.dcm", np.full((8, 8), p, np.int16), patient=f"P{p:02d}")
    rows = "".join(f"p{p}_{i}.dcm,{p % 2},\n" for p in range(12) for i in range(1 + p % 3))
    (tmp_path / "m.csv").write_text("path,label,patient_id\n" + rows)
    args = argparse.Namespace(data=str(tmp_path / "m.csv"), image_size=None, channels=None, split="train",
                              test_data=None, test_split="test", test_fraction=0.3, seed=0)
    train, test, info = load_labelled_data(args, None)
    assert not set(train.patient_ids) & set(test.patient_ids) and "patient-level" in info["held_out"]
    (tmp_path / "test.csv").write_text("path,label,patient_id\np0_0.dcm,0,\np11_0.dcm,1,\n")
    args.test_data, args.test_split = str(tmp_path / "test.csv"), "train"
    with pytest.raises(DataError, match="2 patients also have images in --data") as caught:
        load_labelled_data(args, None)
    assert "P00" not in str(caught.value)
    data = load_dataset(str(tmp_path / "m.csv"))
    owners = [set(client_subset(data, 3, c).patient_ids) for c in range(3)]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    split = Demo(DemoConfig(clients=2, test_fraction=0.3, out=str(tmp_path / "demo"))).split(data, seed=0)
    ids = data.patient_ids
    test_patients = set(ids[split.test.numpy()])
    client_patients = [set(ids[c.numpy()]) for c in split.clients]
    assert not test_patients & (client_patients[0] | client_patients[1])
    assert not client_patients[0] & client_patients[1]


# ---- options and bad input -----------------------------------------------------------------------------------------

def test_bad_windows_axes_and_options_are_one_line_errors(tmp_path):
    ct = sample("CT_small.dcm")
    volume = write_nifti(tmp_path / "v.nii", np.zeros((4, 4, 4), np.float32), np.eye(4))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    cases = [
        (lambda: load_dataset(ct, window="lungs"), "window='lungs'.*preset"),
        (lambda: load_dataset(ct, window="40,0"), "width a positive number"),
        (lambda: load_dataset(ct, window="40,abc"), "window='40,abc'"),
        (lambda: load_dataset(f"{ct}?window=nope"), "window='nope'"),
        (lambda: load_dataset(f"{ct}?colour=1"), "unknown option 'colour'"),
        (lambda: load_dataset(f"{ct}?window"), "must be key=value"),
        (lambda: load_dataset(f"{ct}?window=lung", window="bone"), "window is given twice"),
        (lambda: load_dataset(ct, axis="coronal"), "axis= applies to NIfTI"),
        (lambda: load_dataset(volume, axis="transverse"), "axis='transverse'"),
        (lambda: load_dataset(ct, split="test"), "has no splits"),
        (lambda: load_dataset(str(tmp_path), window="lung"), "window= applies to DICOM and NIfTI"),
        (lambda: load_dataset("synthetic:10?window=lung"), "window= applies to DICOM and NIfTI"),
    ]
    for call, message in cases:
        with pytest.raises(DataError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value), message


def test_bad_dicom_and_nifti_files_name_the_file(tmp_path):
    fake = tmp_path / "fake.dcm"
    fake.write_text("hello, not a DICOM file")
    four_d = write_nifti(tmp_path / "series.nii.gz", np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    garbage = tmp_path / "broken.nii"
    garbage.write_bytes(b"\0" * 100)
    odd = write_dicom(tmp_path / "odd.dcm", np.zeros((4, 4), np.int16))
    ds = pydicom.dcmread(odd)
    ds.PhotometricInterpretation = "HSV"
    ds.save_as(odd)
    cases = [(str(fake), "not a DICOM file"), (sample("rtplan.dcm"), "has no pixel data"),
             (str(odd), "unsupported photometric interpretation 'HSV'"), (four_d, "is 4-D.*3-D volume"),
             (str(garbage), "not a readable NIfTI")]
    for path, message in cases:
        with pytest.raises(DataError, match=message) as caught:
            load_dataset(path)
        assert path in str(caught.value) and "\n" not in str(caught.value)


def test_mixed_sizes_need_a_resize(tmp_path):
    write_dicom(tmp_path / "a.dcm", np.zeros((8, 8), np.int16))
    write_dicom(tmp_path / "b.dcm", np.zeros((6, 8), np.int16))
    with pytest.raises(DataError, match="different sizes.*size="):
        load_dataset(str(tmp_path))
    assert load_dataset(str(tmp_path), size=16, channels=3).to_tensor().shape == (2, 3, 16, 16)


# ---- end to end: encode writes a shard without patient identifiers -------------------------------------------------

def test_cli_encode_of_a_manifest_writes_a_shard_without_patient_ids(tmp_path):
    from msd_fast import Key
    from msd_fast.protocol.shards import open_shard

    secret_patient, study = "PATIENT-SECRET-4711", generate_uid()
    for i in range(4):
        write_dicom(tmp_path / f"s{i}.dcm", np.full((16, 16), 40 * i, np.int16), patient=secret_patient,
                    study=study, window=(40, 400))
    write_nifti(tmp_path / "v.nii.gz", np.arange(16 * 16 * 2, dtype=np.float32).reshape(16, 16, 2), np.eye(4))
    (tmp_path / "m.csv").write_text("path,label,patient_id\n" + "".join(f"s{i}.dcm,a,\n" for i in range(4))
                                    + "v.nii.gz,b,OTHER-PATIENT-0815\n")
    key = Key.generate()
    key.save(tmp_path / "k.key")
    shard = tmp_path / "site.shard"
    env = dict(os.environ, PYTHONPATH=REPO)
    command = [sys.executable, "-m", "msd_fast.cli", "encode", "--data", f"{tmp_path / 'm.csv'}?window=brain",
               "--key", str(tmp_path / "k.key"), "--out", str(shard), "--patch-size", "8"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    opened = open_shard(str(shard))
    assert len(opened) == 6
    content = shard.read_bytes()
    for identifier in (secret_patient, "OTHER-PATIENT-0815", study, str(tmp_path)):
        assert identifier.encode() not in content and identifier.encode("utf-16-le") not in content
    from msd_fast.client.encode import decrypt_shard

    plain = decrypt_shard(str(shard), key)
    np.testing.assert_array_equal(plain[:4, 0, 0, 0].numpy(), linear_exact([0, 40, 80, 120], 40, 80))


def test_cli_bad_window_is_one_line_exit_status_2_and_writes_nothing(tmp_path, capsys):
    from msd_fast import Key
    from msd_fast.cli.commands import main

    Key.generate().save(tmp_path / "k.key")
    path = write_dicom(tmp_path / "s.dcm", np.zeros((16, 16), np.int16))
    assert main(["encode", "--data", f"{path}?window=x", "--key", str(tmp_path / "k.key"),
                 "--out", str(tmp_path / "bad.shard")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("msd-fast encode: error: ") and "window='x'" in err
    assert not (tmp_path / "bad.shard").exists()
