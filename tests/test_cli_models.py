import json
import subprocess
import sys


def test_segcore_models_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "segcore.cli", "models"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("unet", "u2net", "u2netp", "u2netp-rec"):
        assert f"\n{name} " in "\n" + r.stdout.split("architectures")[1]
    assert "1,128,333" in r.stdout  # u2netp


def test_segcore_models_json():
    import contextlib
    import io

    from segcore.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(buf.getvalue())["architectures"]}
    assert rows["u2net"]["input_multiple"] == 32
    assert rows["unet"]["input_multiple"] == 16


def test_no_verb_is_an_error():
    r = subprocess.run([sys.executable, "-m", "segcore.cli"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
