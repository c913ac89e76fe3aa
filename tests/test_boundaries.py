import subprocess
import sys


def test_segcore_never_imports_prefect_or_flows():
    code = (
        "import sys, segcore, segcore.models, segcore.models.checkpoint, segcore.cli\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.walk_packages(segcore.__path__, 'segcore.'):\n"
        "    if not m.name.endswith(('__main__', 'segcore.demo')):\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'prefect_dask', 'prefect_aws', 'flows'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
