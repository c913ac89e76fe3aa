"""Hostile and broken inputs through `segcore segment` (issue 13, item 4).

Every case runs the CLI (``segcore.cli.main``, or a real process where the case needs one)
and asserts: the exit code; for a refusal, one error line that names the input and says what
to change, no traceback, and nothing published as complete (no COMPLETE, no report.json).
The few inputs that are valid (a 1x1 image, NaN/inf pixels) must instead give a defined
result. The table in docs/RELIABILITY.md lists what each case prints and leaves behind; run
with ``-s`` to print it.

Cases that could allocate a huge amount of memory if the product regressed run in one child
process with an address-space limit (8 GiB) that also reports its peak RSS.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr

from segcore.cli import main
from segcore.config import InputContract, ModelSpec, Normalization
from segcore.models import build_model
from segcore.models.checkpoint import checkpoint_bytes
from tests.test_pipeline import make_model, make_scene, reference

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--tile", "64", "--halo", "16", "--workers", "0", "--quiet", "--no-skip-background"]
AS_LIMIT = 8 << 30  # address space of the child process for the allocation cases
MAX_RSS_MB = 1500  # torch + segcore imported: ~250-600 MB


# --- the inputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Any]:
    """Models and scenes shared by the cases (read-only)."""
    d = tmp_path_factory.mktemp("kit")
    model, contract, ckpt = make_model(d)
    _, _, grey_model = make_model(d, cin=1, name="grey.safetensors")
    torch.manual_seed(1)
    fmodel = build_model(ModelSpec(arch="unet", in_channels=3, out_channels=1,
                                   kwargs={"depth": 2, "width": 4})).eval()
    fcontract = InputContract(channels=3, normalization=Normalization(
        scale=1.0, mean=(0.5,) * 3, std=(0.25,) * 3))
    fckpt = d / "float.safetensors"
    fckpt.write_bytes(checkpoint_bytes(fmodel, fcontract))
    _, scene = make_scene(d, 128, 128)
    return {"dir": d, "model": ckpt, "torch_model": model, "contract": contract,
            "grey_model": grey_model, "float_model": str(fckpt), "scene": scene}


def huge_tiff(path: Path, h: int, w: int) -> str:
    """A 300-byte TIFF whose tags declare an h x w RGB image in one zlib strip."""
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="rgb",
                     compression="zlib", metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as t:
        tags = t.pages[0].tags
        tags["ImageWidth"].overwrite(w)
        tags["ImageLength"].overwrite(h)
        tags["RowsPerStrip"].overwrite(h)
    with tifffile.TiffFile(path) as t:  # check of the input: the header does declare it
        assert t.pages[0].shape == (h, w, 3)
    assert path.stat().st_size < 1000
    return str(path)


def png_bomb(path: Path, side: int = 14000) -> str:
    """A real decompression bomb: a grey side x side PNG of zeros (196 MB decoded, over
    Pillow's refusal threshold of 179 M pixels) in under 1 MB, compressed 1000 rows at a
    time (never held whole)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + \
            zlib.crc32(kind + data).to_bytes(4, "big")

    z, rows, parts = zlib.compressobj(1), b"\x00" * ((side + 1) * 1000), []  # filter 0, black
    for _ in range(side // 1000):
        parts.append(z.compress(rows))
    parts.append(z.flush())
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    assert path.stat().st_size < 1_000_000 and side % 1000 == 0
    return str(path)


def svs_with_corrupt_tile(d: Path) -> str:
    """An SVS-like JPEG-tiled TIFF (Aperio description) with one tile's bytes zeroed."""
    img = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    good = d / "good.svs"
    tifffile.imwrite(good, img, tile=(64, 64), compression="jpeg", photometric="rgb",
                     description="Aperio Image Library v12.0.0\n256x256 -> 256x256 - "
                                 "|AppMag = 20|MPP = 0.5")
    with tifffile.TiffFile(good) as t:
        assert t.is_svs
        off, n = t.pages[0].dataoffsets[5], t.pages[0].databytecounts[5]
    data = bytearray(good.read_bytes())
    data[off:off + n] = bytes(n)
    (d / "bad.svs").write_bytes(bytes(data))
    return str(d / "bad.svs")


class Evil:
    """A pickle payload: unpickling it creates the marker file (runs code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- the cases ----------------------------------------------------------------------------
@dataclass
class Case:
    """``build(ctx)`` returns the CLI arguments {src, dst, model, extra}; ``needles`` must be
    in the error line (the input and the fix); ``check(ctx, args)`` asserts more."""

    build: Any
    needles: tuple[str, ...] = ()
    rc: int = 2
    where: str = "inproc"  # 'inproc' | 'isolated' (a child process with a memory limit)
    check: Any = None
    s3: bool = False


def _default(ctx, **kw) -> dict:
    return {"src": ctx.kit["scene"], "dst": str(ctx.tmp / "out"), "model": ctx.kit["model"],
            "extra": [], **kw}


def _write(ctx, name: str, data: bytes) -> str:
    (ctx.tmp / name).write_bytes(data)
    return str(ctx.tmp / name)


def c_truncated(ctx):
    _, good = make_scene(ctx.tmp, 256, 256, name="whole.tif")
    data = Path(good).read_bytes()
    return _default(ctx, src=_write(ctx, "cut.tif", data[: len(data) // 2]))


def c_header_only(ctx):
    return _default(ctx, src=_write(ctx, "head.tif", Path(ctx.kit["scene"]).read_bytes()[:64]))


def c_one_by_one(ctx):
    tifffile.imwrite(ctx.tmp / "one.tif", np.full((1, 1, 3), 90, np.uint8), photometric="rgb")
    return _default(ctx, src=str(ctx.tmp / "one.tif"), extra=["--halo", "auto"])


def check_one_by_one(ctx, args):
    root = zarr.open_group(f"{args['dst']}/result.zarr", mode="r")
    prob, mask = root["0"][:], root["labels/mask/0"][:]
    assert prob.shape == (1, 1, 1) and mask.shape == (1, 1)
    img = np.full((1, 1, 3), 90, np.uint8)
    ref = reference(ctx.kit["torch_model"], ctx.kit["contract"], img, 4)  # whole-image run
    assert abs(int(prob[0, 0, 0]) - round(float(ref[0, 0, 0]) * 255)) <= 1
    assert Path(args["dst"], "COMPLETE").exists()


def _float_scene(ctx, name: str, bad: float) -> str:
    img = np.random.default_rng(4).random((96, 96, 3)).astype(np.float32)
    img[10:20, 10:20] = bad  # every channel: nodata pixels
    img[40:44, 60:70, 1] = bad  # one channel only: that value filled, the pixel kept
    img[70:75, 5:15] = -bad if bad == bad else bad
    tifffile.imwrite(ctx.tmp / name, img, photometric="rgb", tile=(32, 32))
    return str(ctx.tmp / name)


def c_nan_inf(ctx):
    return _default(ctx, src=_float_scene(ctx, "inf.tif", np.inf), model=ctx.kit["float_model"],
                    extra=["--tile", "128", "--halo", "auto"])


def check_nan_inf(ctx, args):
    """+-inf are missing data exactly as NaN is: the same bytes as the NaN scene, label 255
    where every channel is missing, finite probabilities everywhere."""
    nan_out = str(ctx.tmp / "nan-out")
    argv = ["segment", _float_scene(ctx, "nan.tif", np.nan), nan_out, "--model",
            ctx.kit["float_model"], *RUN, "--tile", "128", "--halo", "auto"]
    assert main(argv) == 0
    a = zarr.open_group(f"{args['dst']}/result.zarr", mode="r")
    b = zarr.open_group(f"{nan_out}/result.zarr", mode="r")
    np.testing.assert_array_equal(a["0"][:], b["0"][:])
    np.testing.assert_array_equal(a["labels/mask/0"][:], b["labels/mask/0"][:])
    mask = a["labels/mask/0"][:]
    assert (mask[10:20, 10:20] == 255).all() and (mask[70:75, 5:15] == 255).all()
    assert (mask == 255).sum() == 100 + 50 and set(np.unique(mask)) <= {0, 1, 255}


def c_uint16(ctx):
    img = np.random.default_rng(2).integers(0, 4000, (64, 64, 3)).astype(np.uint16)
    tifffile.imwrite(ctx.tmp / "u16.tif", img, photometric="rgb")
    return _default(ctx, src=str(ctx.tmp / "u16.tif"))


def c_float(ctx):
    img = np.random.default_rng(3).random((64, 64, 3)).astype(np.float32)
    tifffile.imwrite(ctx.tmp / "f32.tif", img, photometric="rgb")
    return _default(ctx, src=str(ctx.tmp / "f32.tif"))


def c_channels(ctx):
    _, grey = make_scene(ctx.tmp, 64, 64, c=1, name="grey.tif")
    return _default(ctx, src=grey)


def c_model_dir(ctx):
    (ctx.tmp / "models").mkdir()
    return _default(ctx, model=str(ctx.tmp / "models"))


def c_evil_pickle(ctx):
    path = ctx.tmp / "evil.pt"
    torch.save({"state_dict": Evil(str(ctx.tmp / "pwned"))}, path)
    return _default(ctx, model=str(path))


def check_evil(ctx, args):
    marker = ctx.tmp / "pwned"
    assert not marker.exists()  # refused without unpickling
    torch.load(args["model"], weights_only=False)  # check of the check: the payload does run
    assert marker.exists()


def c_raw_pickle(ctx):
    return _default(ctx, model=_write(ctx, "evil.pkl", pickle.dumps(Evil(str(ctx.tmp / "pwned")))))


def check_raw_pickle(ctx, args):
    assert not (ctx.tmp / "pwned").exists()
    pickle.loads(Path(args["model"]).read_bytes())
    assert (ctx.tmp / "pwned").exists()


def c_tampered(ctx):
    data = bytearray(Path(ctx.kit["model"]).read_bytes())
    data[-3] ^= 0x40  # one bit of the last weight
    return _default(ctx, model=_write(ctx, "tampered.safetensors", bytes(data)))


def c_mismatch(ctx):
    """Weights of width 4 under a spec saying width 8, with a matching digest: only the
    shapes tell."""
    spec = ModelSpec(arch="unet", in_channels=3, out_channels=1, kwargs={"depth": 2, "width": 8})
    data = checkpoint_bytes(ctx.kit["torch_model"], ctx.kit["contract"], spec=spec)
    return _default(ctx, model=_write(ctx, "mismatch.safetensors", data))


def c_other_scene(ctx):
    out = str(ctx.tmp / "shared")
    assert main(["segment", ctx.kit["scene"], out, "--model", ctx.kit["model"], *RUN]) == 0
    ctx.before = {n: Path(out, n).read_bytes() for n in ("COMPLETE", "report.json")}
    _, other = make_scene(ctx.tmp, 100, 100, name="other.tif", seed=3)
    return _default(ctx, src=other, dst=out)


def check_other_scene(ctx, args):
    for name, data in ctx.before.items():  # the first scene's result is untouched
        assert Path(args["dst"], name).read_bytes() == data
    assert json.loads(ctx.before["report.json"])["src"] == ctx.kit["scene"]


def c_foreign_plan(ctx):
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "plan.json").write_text("project plan: not JSON\n")
    return _default(ctx)


def check_foreign_plan(ctx, args):
    assert Path(args["dst"], "plan.json").read_text() == "project plan: not JSON\n"


def c_zarr_codec(ctx):
    z = zarr.create_array(str(ctx.tmp / "codec.zarr"), shape=(64, 64, 3), chunks=(32, 32, 3),
                          dtype="uint8")
    z[:] = 7
    meta_path = ctx.tmp / "codec.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].append({"name": "evil_codec", "configuration": {"run": "rm -rf /"}})
    meta_path.write_text(json.dumps(meta))
    return _default(ctx, src=str(ctx.tmp / "codec.zarr"))


def c_zarr_huge_shape(ctx):
    zarr.create_array(str(ctx.tmp / "huge.zarr"), shape=(10**9, 10**9, 3), chunks=(256, 256, 3),
                      dtype="uint8")  # metadata only
    return _default(ctx, src=str(ctx.tmp / "huge.zarr"))


def c_zarr_huge_chunk(ctx):
    zarr.create_array(str(ctx.tmp / "chunk.zarr"), shape=(60000, 60000, 3),
                      chunks=(60000, 60000, 3), dtype="uint8")  # one 10.8 GB chunk
    return _default(ctx, src=str(ctx.tmp / "chunk.zarr"))


def c_s3_escape(ctx):
    return _default(ctx, dst=f"{ctx.bucket}/out/../../{ctx.bucket[5:]}-other/escaped")


def c_s3_no_bucket_dst(ctx):
    return _default(ctx, dst="s3://segcore-no-such-bucket/out")


def c_s3_no_bucket_src(ctx):
    return _default(ctx, src="s3://segcore-no-such-bucket/in/scene.tif")


def c_s3_no_credentials(ctx):
    ctx.client.upload_file(ctx.kit["scene"], ctx.bucket[5:], "in/scene.tif")
    return _default(ctx, src=f"{ctx.bucket}/in/scene.tif")


CASES: dict[str, Case] = {
    "zero-byte file": Case(lambda c: _default(c, src=_write(c, "empty.tif", b"")),
                           ("empty.tif", "is empty (0 bytes)", "copy or export it again")),
    "text file named .tif": Case(
        lambda c: _default(c, src=_write(c, "notes.tif", b"this is not an image\n")),
        ("notes.tif", "not an image", "check the file")),
    "truncated TIFF": Case(c_truncated, ("cut.tif", "truncated TIFF", "export the file again")),
    "TIFF header only": Case(c_header_only, ("head.tif", "not a readable TIFF",
                                             "check the file is complete")),
    "corrupt JPEG tile in an SVS": Case(
        lambda c: _default(c, src=svs_with_corrupt_tile(c.tmp)),
        ("bad.svs", "cannot decode region", "corrupt or truncated: copy or export it again")),
    "1x1 image": Case(c_one_by_one, rc=0, check=check_one_by_one),
    "TIFF declaring 10^6 x 10^6 px": Case(
        lambda c: _default(c, src=huge_tiff(c.tmp / "huge.tif", 10**6, 10**6)),
        ("huge.tif", "declares 1000000 x 1000000 pixels", "SEGCORE_MAX_PIXELS"),
        where="isolated"),
    "TIFF declaring one 10^5 x 10^5 strip": Case(
        lambda c: _default(c, src=huge_tiff(c.tmp / "strip.tif", 10**5, 10**5)),
        ("strip.tif", "chunks of 100000 x 100000 x 3", "save it tiled"), where="isolated"),
    "decompression-bomb PNG": Case(
        lambda c: _default(c, src=png_bomb(c.tmp / "bomb.png")),
        ("bomb.png", "decompression bomb", "convert it to a tiled TIFF"), where="isolated"),
    "Zarr declaring 10^9 x 10^9 px": Case(
        c_zarr_huge_shape, ("huge.zarr", "declares 1000000000 x 1000000000", "--level"),
        where="isolated"),
    "Zarr with one 10 GB chunk": Case(
        c_zarr_huge_chunk, ("chunk.zarr", "chunks of 60000 x 60000 x 3", "save it tiled"),
        where="isolated"),
    "Zarr with an unknown codec": Case(c_zarr_codec, ("codec.zarr", "evil_codec",
                                                      "write the array again")),
    "NaN/inf in a float scene": Case(c_nan_inf, rc=0, check=check_nan_inf),
    "16-bit input to an 8-bit model": Case(
        c_uint16, ("u16.tif", "holds uint16 pixels", "trained on 8-bit input",
                   "convert the scene to 8 bits")),
    "float input to an 8-bit model": Case(
        c_float, ("f32.tif", "holds float32 pixels", "convert the scene to 8 bits")),
    "wrong channel count": Case(c_channels, ("grey.tif", "has 1 channel(s)",
                                             "pick a matching scene or model")),
    "missing model": Case(
        lambda c: _default(c, model=str(c.tmp / "nope.safetensors")),
        ("nope.safetensors", "no such file", "check the path")),
    "model path is a directory": Case(c_model_dir, ("models", "is a directory",
                                                    "expected a file")),
    "model is not a checkpoint (a TIFF)": Case(
        lambda c: _default(c, model=c.kit["scene"]),
        ("scene.tif", "not a segcore checkpoint", "segcore train")),
    "pickled checkpoint (torch.save) that runs code": Case(
        c_evil_pickle, ("evil.pt", "not a segcore checkpoint", "segcore train"),
        check=check_evil),
    "raw pickle that runs code": Case(
        c_raw_pickle, ("evil.pkl", "not a segcore checkpoint", "segcore train"),
        check=check_raw_pickle),
    "weights altered after export": Case(
        c_tampered, ("tampered.safetensors", "recorded digest", "re-export it")),
    "weights that do not fit their spec": Case(
        c_mismatch, ("mismatch.safetensors", "weights do not match the spec 'unet'",
                     "re-export it")),
    "output prefix holds another scene's result": Case(
        c_other_scene, ("holds the result of another scene", "scene.tif",
                        "into another output prefix"), check=check_other_scene),
    "output prefix holds a foreign plan.json": Case(
        c_foreign_plan, ("plan.json", "is not a segcore plan", "choose another one"),
        check=check_foreign_plan),
    "unknown URI scheme (input)": Case(
        lambda c: _default(c, src="foo://bucket/scene.tif"),
        ("foo://bucket/scene.tif", "unsupported URI", "use a local path, file:// or s3://")),
    "unknown URI scheme (output)": Case(
        lambda c: _default(c, dst="foo://bucket/out"),
        ("foo://bucket/out", "unsupported URI", "use a local path, file:// or s3://")),
    "output URI escaping its prefix (s3://b/out/../../x)": Case(
        c_s3_escape, ("/out/../../", "'..' segments are not allowed", "without them"),
        s3=True),
    "nonexistent bucket (output)": Case(
        c_s3_no_bucket_dst, ("s3://segcore-no-such-bucket/out", "create the bucket"), s3=True),
    "nonexistent bucket (input)": Case(
        c_s3_no_bucket_src, ("s3://segcore-no-such-bucket/in/scene.tif", "no such file",
                             "check the path"), s3=True),
    "missing credentials": Case(
        c_s3_no_credentials, ("/in/scene.tif", "no usable S3 credentials",
                              "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        where="isolated", s3=True),
}


# --- running them -------------------------------------------------------------------------
class Ctx:
    def __init__(self, tmp: Path, kit: dict, s3=None) -> None:
        self.tmp, self.kit, self.s3 = tmp, kit, s3
        self.bucket = s3.make_bucket() if s3 is not None else None
        self.client = s3.client() if s3 is not None else None


def argv(args: dict) -> list[str]:
    return ["segment", args["src"], args["dst"], "--model", args["model"], *RUN, *args["extra"]]


DRIVER = r"""
import contextlib, io, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from segcore.cli import main
results = []
for argv in json.loads(sys.stdin.read()):
    err, t0 = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException:  # a regression: report it, the test fails on it
            import traceback
            traceback.print_exc(file=err)
            rc = -1
    results.append({"rc": rc, "stderr": err.getvalue(), "seconds": time.perf_counter() - t0,
                    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def isolated(kit, tmp_path_factory, s3_server) -> dict[str, dict]:
    """The 'isolated' cases, all in one fresh child process (one torch import, no AWS
    credentials anywhere) under an 8 GiB address-space limit:
    {case: {ctx, args, rc, stderr, seconds, maxrss_mb}}."""
    names = [n for n, c in CASES.items() if c.where == "isolated"]
    built = {}
    for n in names:
        ctx = Ctx(tmp_path_factory.mktemp("iso"), kit, s3_server if CASES[n].s3 else None)
        built[n] = (ctx, CASES[n].build(ctx))
    r = subprocess.run([sys.executable, "-c", DRIVER, str(AS_LIMIT)], cwd=ROOT, text=True,
                       input=json.dumps([argv(a) for _, a in built.values()]),
                       env=no_credentials_env(s3_server), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    return {n: {"ctx": built[n][0], "args": built[n][1], **res}
            for n, res in zip(names, results, strict=True)}


def no_credentials_env(s3) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1",
               SEGCORE_S3_ENDPOINT_URL=s3.endpoint_url)
    return env


def published(ctx: Ctx, dst: str) -> list[str]:
    """What lies under ``dst`` afterwards (top level names), local or on the test S3."""
    if dst.startswith("s3://"):
        bucket, _, prefix = dst[5:].partition("/")
        try:
            objs = ctx.client.list_objects_v2(Bucket=bucket).get("Contents", [])
        except ctx.client.exceptions.NoSuchBucket:
            return []
        return sorted({o["Key"] for o in objs if not o["Key"].startswith("in/")})
    p = Path(dst)
    return sorted(q.name for q in p.iterdir()) if p.is_dir() else []


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, kit, tmp_path, capfd, request):
    case = CASES[name]
    s3 = request.getfixturevalue("s3_server") if case.s3 else None
    t0 = time.perf_counter()
    if case.where == "isolated":
        res = request.getfixturevalue("isolated")[name]
        ctx, args, rc, err = res["ctx"], res["args"], res["rc"], res["stderr"]
        took = f"{res['seconds']:.2f} s in the child, peak RSS {res['maxrss_mb']:.0f} MB"
        assert res["maxrss_mb"] < MAX_RSS_MB, res  # refused before allocating anything
        assert res["seconds"] < 30, res
    else:
        ctx = Ctx(tmp_path, kit, s3)
        args = case.build(ctx)
        capfd.readouterr()
        rc = main(argv(args))
        err = capfd.readouterr().err
        took = f"{time.perf_counter() - t0:.2f} s"
    left = published(ctx, args["dst"])
    lines = [ln for ln in err.splitlines() if ln.startswith("segcore segment:")]
    print(f"\n| {name} | `{lines[0] if lines else ''}` | {rc} | {', '.join(left) or 'nothing'} "
          f"| {took} |")
    assert rc == case.rc, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if case.rc != 0:
        assert len(lines) == 1, err[-3000:]  # one error line, the input and the fix in it
        for needle in case.needles:
            assert needle in lines[0], (needle, lines[0])
        if case.check is not check_other_scene:
            assert "COMPLETE" not in left and "report.json" not in left, left
            assert not any(k.endswith(("/COMPLETE", "/report.json")) for k in left), left
    if case.check is not None:
        case.check(ctx, args)
