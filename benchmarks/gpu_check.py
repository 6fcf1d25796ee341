"""``make gpu-check``: the CUDA checks in one command, from this repository's files alone.

On a machine with a CUDA device and a preinstalled torch (no network needed):

1. unpacks the peer's pure-Python wheels (``benchmarks/wheels/``, fetched by
   ``make gpu-wheels``) into ``build/gpu-site`` and puts it and ``src/`` on ``PYTHONPATH``
   (nothing is pip-installed; the project runs from source);
2. runs the ``gpu``-marked tests (``tests/test_gpu.py`` and any other test file that has
   some) under a time limit;
3. runs the short CUDA benchmark (``benchmarks.cuda``) in the time left;
4. writes ``benchmarks/results/cuda/`` (``cuda.json`` with the device, torch and CUDA versions,
   ``gpu_check.json`` with the tests' outcome and wall times, ``tests.log``, ``cuda.md``, plots)
   and regenerates the README's GPU section.

Without CUDA (or without torch) it prints one line and exits 0. Exit status 1 when a test
failed (the benchmark and the results are still written). Standard library only up to the
CUDA check, so it runs under any ``python3``.

    python3 -m benchmarks.gpu_check [--budget 420] [--tests-limit 240] [--copy-to DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "benchmarks" / "wheels"
SITE = ROOT / "build" / "gpu-site"
RESULTS = ROOT / "benchmarks" / "results" / "cuda"


def cuda_device() -> str | None:
    """The first CUDA device's name, or None after printing why there is nothing to run."""
    try:
        import torch
    except ImportError:
        print(f"gpu-check: {sys.executable} cannot import torch; nothing to run (needs CUDA)")
        return None
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}); nothing to run")
        return None
    return torch.cuda.get_device_name(0)


def unpack_wheels(wheels: Path = WHEELS, site: Path = SITE) -> list[str]:
    """Pure-Python wheels are zip archives of importable files: unpack them into ``site``."""
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    names = []
    for whl in sorted(wheels.glob("*.whl")):
        if not whl.name.endswith("-none-any.whl"):
            print(f"gpu-check: skipping {whl.name} (not a pure-Python wheel)")
            continue
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        names.append(whl.name)
    return names


def environment() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(SITE), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def gpu_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test files holding ``gpu``-marked tests (collecting only these keeps test modules
    that need packages the GPU machine lacks, e.g. transformers, out of the run)."""
    return sorted(
        f.relative_to(ROOT).as_posix()
        for f in tests.glob("test_*.py")
        if "pytest.mark.gpu" in f.read_text()
    )


def run_tests(env: dict[str, str], limit: float, results: Path) -> dict[str, Any]:
    """``pytest -m gpu`` on `gpu_test_files`; the log and a JUnit XML go to ``results``."""
    junit = results / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", *gpu_test_files(), "-m", "gpu", "-q", "-rfEs",
           "--durations=15", "-p", "no:cacheprovider", f"--junitxml={junit}"]  # fmt: skip
    print("gpu-check: " + " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    with open(results / "tests.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        watchdog = threading.Timer(limit, proc.kill)  # a hung test cannot eat the budget
        watchdog.start()
        assert proc.stdout is not None
        for line in proc.stdout:  # echo and keep the log
            sys.stdout.write(line)
            log.write(line)
        proc.wait()
        watchdog.cancel()
        timed_out = time.monotonic() - t0 >= limit and proc.returncode != 0
        if timed_out:
            note = f"gpu-check: tests stopped at their time limit ({limit:.0f} s)"
            log.write(f"\n{note}\n")
            print(note, flush=True)
    summary = _junit_summary(junit)
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    summary.update(status=status,
                   returncode=proc.returncode, wall_s=round(time.monotonic() - t0, 1))  # fmt: skip
    return summary


def _junit_summary(path: Path) -> dict[str, Any]:
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    if not path.exists():
        return counts | {"failed_ids": failed}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            failed.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failed.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts | {"failed_ids": failed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budget", type=float, default=420.0, help="seconds for everything")
    p.add_argument("--tests-limit", type=float, default=240.0, help="seconds for the tests")
    p.add_argument("--copy-to", default=os.environ.get("COPY_TO") or None,
                   help="also copy the results and README.md there ($COPY_TO)")  # fmt: skip
    args = p.parse_args(argv)
    start = time.monotonic()
    gpu = cuda_device()
    if gpu is None:
        return 0
    import torch

    print(f"gpu-check: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    shutil.rmtree(RESULTS, ignore_errors=True)  # no stale file may pass for this run's
    RESULTS.mkdir(parents=True)
    wheels = unpack_wheels()
    print(f"gpu-check: unpacked {len(wheels)} wheels into {SITE.relative_to(ROOT)}", flush=True)
    env = environment()
    check: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                             "wheels": wheels, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                     time.gmtime())}  # fmt: skip
    check["tests"] = run_tests(env, min(args.tests_limit, args.budget - 120), RESULTS)
    left = args.budget - (time.monotonic() - start) - 25  # keep time for the report
    t0 = time.monotonic()
    bench = [sys.executable, "-m", "benchmarks.cuda", "--time-limit", f"{max(left, 30):.0f}",
             "--out", str(RESULTS)]  # fmt: skip
    print("gpu-check: " + " ".join(bench[1:]), flush=True)
    try:
        rc = subprocess.run(bench, cwd=ROOT, env=env, timeout=max(left, 30) + 60, check=False)
        check["bench"] = {"returncode": rc.returncode}
    except subprocess.TimeoutExpired:
        check["bench"] = {"returncode": None, "status": "timeout"}
    check["bench"]["wall_s"] = round(time.monotonic() - t0, 1)
    check["total_wall_s"] = round(time.monotonic() - start, 1)
    (RESULTS / "gpu_check.json").write_text(json.dumps(check, indent=1) + "\n")
    subprocess.run([sys.executable, "-m", "benchmarks.cuda_report"], cwd=ROOT, env=env,
                   timeout=120, check=False)  # fmt: skip
    if args.copy_to:
        dest = Path(args.copy_to)
        shutil.copytree(RESULTS, dest / "benchmarks" / "results" / "cuda", dirs_exist_ok=True)
        shutil.copy2(ROOT / "README.md", dest / "README.md")
        print(f"gpu-check: copied the results and README.md to {dest}")
    t = check["tests"]
    print(
        f"gpu-check: tests {t['status']} ({t['passed']} passed, {t['failed']} failed, "
        f"{t['errors']} errors, {t['skipped']} skipped); benchmark {check['bench']}; "
        f"{check['total_wall_s']:.0f} s in all. Results: {RESULTS.relative_to(ROOT)}/ — commit "
        f"them with the regenerated README section."
    )
    return 0 if t["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
