"""DICOM whole-slide images (VL Whole Slide Microscopy Image) read through wsidicom.

The slides are written here with pydicom: a TILED_SPARSE base level with one frame left out
(it must read as background) and a TILED_FULL level 1, both of encapsulated JPEG frames with a
basic offset table; JPEG 2000 and uncompressed variants; bad files (a CT slice, truncated
files, a TILED_FULL level with a frame missing). Expected pixels are the frames decoded one by
one with the decoder wsidicom uses (imagecodecs), so a region read is checked exactly.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

from segcore.cli import main
from segcore.errors import InputError
from segcore.io.readers import detect_format, open_scene
from tests.test_pipeline import make_model

TILE = 64
MPP = 0.25  # level 0, micrometres
SHAPE = (300, 410)  # level 0: 5 x 7 tiles; level 1 150 x 205: 3 x 4 tiles
MISSING = (2, 3)  # (tile row, tile col) of level 0 left out of the sparse base level
VOLUME0 = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
VOLUME1 = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]


# --- writing DICOM WSI instances with pydicom ------------------------------------------------
def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _encode(tile: np.ndarray, ts: str) -> bytes:
    if ts == JPEGBaseline8Bit:
        return imagecodecs.jpeg8_encode(tile, level=90)
    if ts == JPEG2000Lossless:
        return imagecodecs.jpeg2k_encode(tile, level=0, codecformat="j2k")
    return tile.tobytes()


def write_instance(path: Path, img: np.ndarray, spacing_um: float, uids: tuple[str, str, str],
                   image_type: list[str], *, ts: str = JPEGBaseline8Bit, sparse: bool = False,
                   missing: tuple = (), absent_lab: tuple | None = None, path_id: str = "0",
                   number: int = 1, bot: bool = True) -> list[tuple[tuple[int, int], bytes]]:
    """Write one VL WSI instance of ``img`` (h, w, 3|1 uint8) tiled by TILE; tiles in
    ``missing`` are left out (TILED_SPARSE lists the others' positions per frame; TILED_FULL
    with ``missing`` is a broken file). Encapsulated frames get a basic offset table unless
    ``bot`` is False (readers then walk the item headers). Returns ((row, col), frame bytes) of each frame."""
    h, w, spp = img.shape
    frames = []
    for ty in range(-(-h // TILE)):
        for tx in range(-(-w // TILE)):
            if (ty, tx) in missing:
                continue
            t = np.zeros((TILE, TILE, spp), np.uint8)
            part = img[ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE]
            t[:part.shape[0], :part.shape[1]] = part
            frames.append(((ty, tx), _encode(t if spp == 3 else t[..., 0], ts)))
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.Modality, ds.ImageType, ds.InstanceNumber = "SM", image_type, number
    ds.Rows = ds.Columns = TILE
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = spp
    if spp == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"
    else:
        ds.PhotometricInterpretation = {JPEGBaseline8Bit: "YBR_FULL_422",
                                        JPEG2000Lossless: "YBR_RCT"}.get(ts, "RGB")
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
    mm = spacing_um / 1000
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * mm, h * mm, 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.ExtendedDepthOfField, ds.FocusMethod, ds.VolumetricProperties = "NO", "AUTO", "VOLUME"
    ds.SpecimenLabelInImage = ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01" if ts == JPEGBaseline8Bit else "00"
    if absent_lab is not None:
        ds.RecommendedAbsentPixelCIELabValue = list(absent_lab)
    measures, frame_type, path_ref, shared = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mm, mm], 0.001
    frame_type.FrameType = image_type
    path_ref.OpticalPathIdentifier = path_id
    shared.PixelMeasuresSequence = [measures]
    shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    shared.OpticalPathIdentificationSequence = [path_ref]
    ds.SharedFunctionalGroupsSequence = [shared]
    op = Dataset()
    op.OpticalPathIdentifier = path_id
    op.IlluminationTypeCodeSequence = [_code("111744", "DCM", "Brightfield illumination")]
    op.IlluminationColorCodeSequence = [_code("414298005", "SCT", "Full Spectrum")]
    ds.OpticalPathSequence = [op]
    if sparse:
        items = []
        for (ty, tx), _ in frames:
            pos = Dataset()
            pos.ColumnPositionInTotalImagePixelMatrix = tx * TILE + 1
            pos.RowPositionInTotalImagePixelMatrix = ty * TILE + 1
            pos.XOffsetInSlideCoordinateSystem = 20.0 + ty * TILE * mm
            pos.YOffsetInSlideCoordinateSystem = 40.0 + tx * TILE * mm
            pos.ZOffsetInSlideCoordinateSystem = 0.0
            item = Dataset()
            item.PlanePositionSlideSequence = [pos]
            items.append(item)
        ds.PerFrameFunctionalGroupsSequence = items
    if ts == ExplicitVRLittleEndian:
        ds.PixelData = b"".join(f for _, f in frames)
    else:
        ds.PixelData = encapsulate([f for _, f in frames], has_bot=bot)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return frames


def slide_image(seed: int = 0) -> np.ndarray:
    """Smooth colour blobs plus a little noise (JPEG-friendly, not constant)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    img = np.zeros((*SHAPE, 3))
    for c in range(3):
        for _ in range(4):
            cy, cx = rng.uniform(0, SHAPE[0]), rng.uniform(0, SHAPE[1])
            img[..., c] += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 45.0**2))
    img += rng.normal(0, 8, img.shape) + 60
    return np.clip(img, 0, 255).astype(np.uint8)


def write_slide(folder: Path, img: np.ndarray, ts: str = JPEGBaseline8Bit,
                absent_lab: tuple | None = None, full_base_missing: bool = False,
                bot: bool = True) -> dict:
    """Level 0: TILED_SPARSE without tile MISSING; level 1 (2x2 mean): TILED_FULL. With
    ``full_base_missing`` the base is a broken TILED_FULL level lacking that frame."""
    uids = (generate_uid(), generate_uid(), generate_uid())
    lv1 = img[: SHAPE[0] // 2 * 2, : SHAPE[1] // 2 * 2].reshape(
        SHAPE[0] // 2, 2, SHAPE[1] // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    f0 = write_instance(folder / "level0.dcm", img, MPP, uids, VOLUME0, ts=ts,
                        sparse=not full_base_missing, missing=(MISSING,), absent_lab=absent_lab,
                        bot=bot)
    f1 = write_instance(folder / "level1.dcm", lv1, 2 * MPP, uids, VOLUME1, ts=ts, number=2,
                        bot=bot)
    return {"frames": [f0, f1], "shapes": [SHAPE, lv1.shape[:2]], "level1": lv1}


def assemble(frames, shape, fill=(255, 255, 255)) -> np.ndarray:
    """A level from its frames decoded one by one; tiles without a frame hold ``fill``."""
    h, w = shape
    ny, nx = -(-h // TILE), -(-w // TILE)
    out = np.empty((ny * TILE, nx * TILE, 3), np.uint8)
    out[:] = fill
    for (ty, tx), data in frames:
        out[ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE] = imagecodecs.jpeg8_decode(data)
    return out[:h, :w]


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("dicom") / "slideA"
    img = slide_image()
    info = write_slide(folder, img)
    info["folder"] = folder
    info["img"] = img
    info["levels"] = [assemble(f, s) for f, s in zip(info["frames"], info["shapes"], strict=True)]
    return info


# --- reading -----------------------------------------------------------------------------------
def test_reads_levels_mpp_and_regions_exactly(slide):
    folder = str(slide["folder"])
    assert detect_format(folder) == "dicom"
    assert detect_format(str(slide["folder"] / "level0.dcm")) == "dicom"
    with open_scene(folder) as s:
        i = s.info
        assert (i.format, i.channels, i.dtype, i.level) == ("dicom", 3, "uint8", 0)
        assert i.level_shapes == (SHAPE, (150, 205))
        assert i.pixel_size == pytest.approx(MPP) and i.pixel_unit == "micrometer"
        lv0 = slide["levels"][0]
        np.testing.assert_array_equal(s.read(0, SHAPE[0], 0, SHAPE[1]), lv0)
        for y0, y1, x0, x1 in [(0, 1, 0, 1), (60, 70, 60, 200), (100, 300, 150, 410),
                               (130, 190, 190, 260)]:  # across tile borders, the missing tile
            np.testing.assert_array_equal(s.read(y0, y1, x0, x1), lv0[y0:y1, x0:x1])
        ty, tx = MISSING
        hole = s.read(ty * TILE, (ty + 1) * TILE, tx * TILE, (tx + 1) * TILE)
        assert (hole == 255).all()  # a frame absent from a sparse level is white background
        a = s.read(0, 10, 0, 10)
        a[:] = 0  # the caller owns what it gets (never wsidicom's cached frame)
        assert s.read(0, 10, 0, 10).any()
    with open_scene(folder, mpp=0.5) as s:
        assert s.info.level == 1 and s.info.pixel_size == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read(0, 150, 0, 205), slide["levels"][1])
    # a Scene travels as its URI and reopens itself (what Dask workers get)
    s2 = pickle.loads(pickle.dumps(open_scene(folder, level=1)))
    np.testing.assert_array_equal(s2.read(5, 77, 60, 140), slide["levels"][1][5:77, 60:140])
    s2.close()
    # one instance file is a slide of one level
    with open_scene(str(slide["folder"] / "level1.dcm")) as s:
        assert s.info.level_shapes == ((150, 205),) and s.info.pixel_size == pytest.approx(0.5)


@pytest.mark.parametrize("ts", [JPEG2000Lossless, ExplicitVRLittleEndian],
                         ids=["jpeg2000-no-offset-table", "uncompressed"])
def test_lossless_frames_read_back_the_pixels(tmp_path, ts):
    img = slide_image(1)
    info = write_slide(tmp_path / "s", img, ts=ts, bot=False)
    with open_scene(str(tmp_path / "s")) as s:
        got = s.read(0, SHAPE[0], 0, SHAPE[1])
    want = img.copy()
    ty, tx = MISSING
    want[ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE] = 255
    np.testing.assert_array_equal(got, want)
    with open_scene(str(tmp_path / "s"), level=1) as s:
        np.testing.assert_array_equal(s.read(0, 150, 0, 205), info["level1"])


def test_absent_frames_take_the_recommended_background(tmp_path):
    img = slide_image(2)
    lab = (int(0.9 * 65535), 0x8080, 0x8080)  # L* 90, neutral: light grey
    write_slide(tmp_path / "s", img, ts=ExplicitVRLittleEndian, absent_lab=lab)
    ty, tx = MISSING
    with open_scene(str(tmp_path / "s")) as s:
        hole = s.read(ty * TILE + 3, (ty + 1) * TILE - 3, tx * TILE - 5, (tx + 1) * TILE)
    assert (hole[:, 5:] == 226).all()  # sRGB of L* 90
    np.testing.assert_array_equal(hole[:, :5], img[ty * TILE + 3:(ty + 1) * TILE - 3,
                                                   tx * TILE - 5:tx * TILE])


def test_optical_paths_become_channels(tmp_path):
    rng = np.random.default_rng(3)
    uids = (generate_uid(), generate_uid(), generate_uid())
    planes = [rng.integers(0, 255, (130, 150, 1), dtype=np.uint8) for _ in range(2)]
    for k, (name, plane) in enumerate(zip(("DAPI", "FITC"), planes, strict=True)):
        write_instance(tmp_path / "s" / f"{name}.dcm", plane, MPP, uids, VOLUME0,
                       ts=ExplicitVRLittleEndian, path_id=name, number=k + 1)
    with open_scene(str(tmp_path / "s")) as s:
        assert s.info.channels == 2 and s.info.channel_names == ("DAPI", "FITC")
        np.testing.assert_array_equal(s.read(10, 120, 5, 150),
                                      np.concatenate(planes, axis=2)[10:120, 5:150])


def test_region_reads_decode_only_the_frames_they_touch(tmp_path, slide):
    folder = tmp_path / "s"
    shutil.copytree(slide["folder"], folder)
    # overwrite the JPEG data of the last frame of level 0 (tile (4, 6)) with garbage
    data = bytearray((folder / "level0.dcm").read_bytes())
    last = slide["frames"][0][-1][1]
    at = bytes(data).rindex(last)
    data[at + 2:at + len(last) - 2] = b"\x00" * (len(last) - 4)
    (folder / "level0.dcm").write_bytes(bytes(data))
    with open_scene(str(folder)) as s:  # opening and far regions never decode that frame
        np.testing.assert_array_equal(s.read(0, 250, 0, 380), slide["levels"][0][:250, :380])
        with pytest.raises(InputError, match=r"/s: cannot decode region y 290:300, x 400:410"):
            s.read(290, 300, 400, 410)


def test_ingest_converts_to_ome_zarr(tmp_path, slide):
    from segcore.io.ingest import IngestConfig, check_ingested, ingest

    dst = str(tmp_path / "img.zarr")
    ingest(IngestConfig(src=str(slide["folder"]), dst=dst, chunk=64, shard=128), progress=False)
    check_ingested(dst)
    root = zarr.open_group(dst, mode="r")
    np.testing.assert_array_equal(root["0"][:], slide["levels"][0].transpose(2, 0, 1))
    assert root.attrs["segcore"]["pixel_size"] == pytest.approx(MPP)
    assert root.attrs["segcore"]["format"] == "dicom"


# --- segmenting: CLI and the Prefect flow on s3 ----------------------------------------------
SEG_ARGS = ["--tile", "256", "--halo", "16", "--workers", "0", "--quiet", "--device", "cpu",
            "--amp", "none", "--no-skip-background"]


def _result(out) -> tuple[np.ndarray, np.ndarray]:
    from segcore.io.uri import join
    from segcore.io.zarrstore import open_group

    root = open_group(join(str(out), "result.zarr"), mode="r")
    return np.asarray(root["labels/mask/0"][:]), np.asarray(root["0"][:])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("model"))[2]


@pytest.fixture(scope="module")
def segmented(slide, model, tmp_path_factory) -> Path:
    """The DICOM slide segmented through the CLI."""
    out = tmp_path_factory.mktemp("seg") / "dicom"
    assert main(["segment", str(slide["folder"]), str(out), "--model", model, *SEG_ARGS]) == 0
    return out


def test_cli_segment_equals_the_same_pixels_as_tiff(slide, model, segmented, tmp_path):
    with open_scene(str(slide["folder"])) as s:
        pixels = s.read(0, SHAPE[0], 0, SHAPE[1])
    tif = tmp_path / "same.tif"
    tifffile.imwrite(tif, pixels, tile=(64, 64), photometric="rgb",
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
    assert main(["segment", str(tif), str(tmp_path / "tif"), "--model", model, *SEG_ARGS]) == 0
    rep = json.loads((segmented / "report.json").read_text())
    assert rep["tiles_run"] == rep["tiles_total"] > 1 and (segmented / "COMPLETE").exists()
    mask_d, prob_d = _result(segmented)
    mask_t, prob_t = _result(tmp_path / "tif")
    assert mask_d.shape == SHAPE
    np.testing.assert_array_equal(mask_d, mask_t)
    np.testing.assert_array_equal(prob_d, prob_t)


@pytest.mark.slow
@pytest.mark.server
def test_segment_scene_flow_reads_the_slide_from_s3(slide, model, segmented, s3_server):
    pytest.importorskip("prefect")
    from prefect.testing.utilities import prefect_test_harness

    from flows.segment import SceneOptions, segment_scene
    from segcore.cluster import ClusterConfig
    from segcore.io.uri import exists, get_fs

    base = s3_server.make_bucket()
    fs, _ = get_fs(base)
    for f in ("level0.dcm", "level1.dcm"):
        fs.put(str(slide["folder"] / f), f"{base}/in/slideA/{f}")
    assert detect_format(f"{base}/in/slideA") == "dicom"
    with open_scene(f"{base}/in/slideA", mpp=0.5) as s:  # s3 reads, level by mpp
        np.testing.assert_array_equal(s.read(20, 150, 30, 205), slide["levels"][1][20:, 30:])
    opts = SceneOptions(tile=256, halo=16, skip_background=False, device="cpu", amp="none",
                        shards_per_task=1, pyramid=False)
    with prefect_test_harness(server_startup_timeout=90):
        r = segment_scene(f"{base}/in/slideA", f"{base}/out", model, opts,
                          ClusterConfig(n_workers=1, threads_per_worker=2, processes=False))
    assert r["status"] == "segmented" and r["out"] == f"{base}/out/slideA"
    assert exists(f"{base}/out/slideA/COMPLETE")
    mask, prob = _result(r["out"])
    mask_cli, prob_cli = _result(segmented)
    np.testing.assert_array_equal(mask, mask_cli)
    np.testing.assert_array_equal(prob, prob_cli)


# --- bad DICOM: a clear error naming the file, nothing published -----------------------------
def _ct_slice(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CT", 32, 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((32, 32), np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("kind", ["ct-file", "ct-folder", "truncated", "header-cut",
                                  "missing-frame"])
def test_bad_dicom_is_refused_with_the_file_named(tmp_path, slide, model, capsys, kind):
    if kind == "ct-file":
        src = tmp_path / "ct.dcm"
        _ct_slice(src)
        named, why = "ct.dcm", "CT Image Storage instance, not a VL Whole Slide"
    elif kind == "ct-folder":
        src = tmp_path / "series"
        _ct_slice(src / "1.dcm")
        _ct_slice(src / "2.dcm")
        named, why = "series", "no VL Whole Slide Microscopy Image pyramid level"
    elif kind in ("truncated", "header-cut"):
        src = tmp_path / "cut"
        shutil.copytree(slide["folder"], src)
        data = (src / "level0.dcm").read_bytes()
        (src / "level0.dcm").write_bytes(data[: len(data) * 2 // 3 if kind == "truncated"
                                              else 600])
        named, why = "level0.dcm", "truncated"
    else:
        src = tmp_path / "holes"
        write_slide(src, slide_image(4), full_base_missing=True)
        named, why = "level0.dcm", "missing frames: NumberOfFrames 34 does not fill"
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["segment", str(src), str(out), "--model", model, *SEG_ARGS])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert named in err and why in err and "Traceback" not in err
    assert not (out / "COMPLETE").exists() and not (out / "report.json").exists()


def test_a_folder_without_zarr_or_dicom_is_still_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="is a directory but not a Zarr"):
        detect_format(str(tmp_path / "d"))


# --- files converters write: VL WSI instances lacking attributes wsidicom needs ---------------
def _strip(path: Path, *keys: str) -> None:
    from pydicom import dcmread

    ds = dcmread(path)
    for k in keys:
        if k in ds:
            delattr(ds, k)
    ds.save_as(path)


NONCONFORMANT = ("ImageType", "DimensionOrganizationType", "FrameOfReferenceUID",
                 "SharedFunctionalGroupsSequence")


def test_nonconformant_dicom_segments_like_the_same_pixels_as_tiff(slide, model, segmented,
                                                                    tmp_path):
    """A slide as pydicom scripts write it (no ImageType, no DimensionOrganizationType, no
    FrameOfReferenceUID, no PixelSpacing in shared functional groups) is read from its frames
    (TILED_FULL order on level 1, per-frame positions on the sparse base) with the pixel size
    inferred from ImagedVolumeWidth, and the report says so; a label image in the folder (no
    ImageType either) is told apart by its shape. The result equals the conformant slide's."""
    from pydicom.uid import generate_uid as uid

    folder = tmp_path / "converted"
    shutil.copytree(slide["folder"], folder)
    label = np.full((120, 120, 3), 200, np.uint8)
    write_instance(folder / "label.dcm", label, MPP, (uid(), uid(), uid()), ["ORIGINAL"])
    for f in ("level0.dcm", "level1.dcm", "label.dcm"):
        _strip(folder / f, *NONCONFORMANT)
    with open_scene(str(folder)) as s:
        assert s.info.level_shapes == (SHAPE, tuple(slide["shapes"][1]))
        assert abs(s.info.pixel_size - MPP) < 1e-6
        assert any("ImagedVolumeWidth" in n for n in s.info.notes)
        np.testing.assert_array_equal(s.read(0, SHAPE[0], 0, SHAPE[1]), slide["levels"][0])
    with open_scene(str(folder), level=1) as s:
        np.testing.assert_array_equal(s.read(3, 150, 5, 205), slide["levels"][1][3:, 5:])
    out = tmp_path / "out"
    assert main(["segment", str(folder), str(out), "--model", model, *SEG_ARGS]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert any("inferred from ImagedVolumeWidth" in w for w in rep["warnings"])
    assert any("lacks ImageType" in w for w in rep["warnings"])
    assert abs(rep["scene"]["pixel_size"] - MPP) < 1e-6
    for a, b in zip(_result(out), _result(segmented), strict=True):
        np.testing.assert_array_equal(a, b)


def test_nonconformant_dicom_that_cannot_be_placed_is_refused(tmp_path, model, capsys):
    """Frames that do not fill the tiles, with neither DimensionOrganizationType nor per-frame
    positions to place them: refused naming what is missing, exit 2, nothing written."""
    from pydicom.uid import generate_uid as uid

    img = slide_image()[:128, :192]
    write_instance(tmp_path / "s" / "a.dcm", img, MPP, (uid(), uid(), uid()), VOLUME0,
                   sparse=True, missing=((0, 0),))
    _strip(tmp_path / "s" / "a.dcm", *NONCONFORMANT, "PerFrameFunctionalGroupsSequence")
    with pytest.raises(InputError, match="PlanePositionSlideSequence"):
        open_scene(str(tmp_path / "s"))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "s"), str(out), "--model", model, *SEG_ARGS]) == 2  # bad input
    err = capsys.readouterr().err
    assert "a.dcm" in err and "DimensionOrganizationType" in err
    assert not out.exists()


def test_an_image_type_wsidicom_does_not_know_reads_from_the_frames(slide, tmp_path):
    """VL WSI instances whose ImageType names no pyramid level wsidicom knows (here TILE
    instead of VOLUME): wsidicom finds no VOLUME instance; the frames reader reads them, the
    same pixels, and says why."""
    from pydicom import dcmread

    folder = tmp_path / "odd"
    shutil.copytree(slide["folder"], folder)
    for f in ("level0.dcm", "level1.dcm"):
        ds = dcmread(folder / f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "TILE"]
        ds.save_as(folder / f)
    with open_scene(str(folder)) as s:
        assert any("wsidicom does not read its header (ImageType ORIGINAL/PRIMARY/TILE)" in n
                   for n in s.info.notes)
        np.testing.assert_array_equal(s.read(0, SHAPE[0], 0, SHAPE[1]), slide["levels"][0])
