"""The device half on 64-bit ARM, under emulation: every device command in a Debian bookworm
arm64 userland (qemu-user), compared with the same commands on this x86 machine.

    sudo python tools/aarch64_check.py [--cache /var/cache/edgetl-aarch64] [--qemu-cpu cortex-a72]

Needs root (chroot, mounts), Debian packages (qemu-user-static, mmdebstrap; installed with
apt-get when missing) and pip; the x86 side runs in this interpreter's environment, which
must have edgetl's host and device extras (the repository's .venv after `pip install -e
".[all]"`). Cached under --cache, reused while valid:

- rootfs/: bookworm arm64 with python3 (3.11) and glibc 2.36, made by mmdebstrap once;
- rootfs/opt/venv: `pip install "edgetl-0.1.0-py3-none-any.whl[device]"` (this checkout's
  wheel, built here; the dependencies' aarch64 wheels come from PyPI through pip's cache in
  the userland), redone when the sources change; rootfs/opt/venv-onnxruntime: the same
  with `[device-onnxruntime]` (one runtime is enough);
- bundle-<hash>/: a small digits bundle (fp32 + int8, ONNX + TFLite) exported here.

Checks, each printed as PASS or MISS (exit 1 on any MISS):

- every `edgetl` command exits 0 on aarch64 (tools/aarch64_device_run.py runs them: inspect,
  verify, predict on both runtimes and every precision, personalize and store history on
  both runtimes, a short bench), and on x86;
- top-1 equal on every backend x precision; fp32 probabilities within 1e-5; personalized
  heads within 1e-6 (x86 against aarch64);
- the expected failure: with edgetl's LiteRT scalar fix turned off, personalizing on LiteRT
  on aarch64 dies of SIGSEGV (exit 139), so the fix is what makes it pass.

qemu and /proc/cpuinfo: qemu-user 7.2 (bookworm's) passes the host's /proc/cpuinfo through,
so an aarch64 process reads an x86 "AMD EPYC" or "Intel" CPU there; with /sys mounted (as on
a board), `import onnxruntime` then dies of SIGSEGV in its CPU detection (cpuinfo; measured
here: exit 139; without /sys it only warns that it cannot parse the CPU lists). The userland
runs in its own mount namespace (unshare) with /proc and /sys mounted and a Cortex-A72
cpuinfo bind-mounted over /proc/cpuinfo, as a Raspberry Pi 4 reports it; QEMU_CPU selects
the same CPU model for the emulator.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
APT_PACKAGES = ("qemu-user-static", "mmdebstrap", "binfmt-support")
# Essential packages plus Python's venv and libstdc++ (which manylinux wheels such as numpy's
# expect from the system, as every board has it), nothing else: every package's maintainer
# scripts run under emulation (no apt, no ca-certificates: pip uses the host's CA bundle).
USERLAND_PACKAGES = "python3-venv,libstdc++6"
FP32_ATOL = 1e-5  # probabilities, fp32 models, x86 vs aarch64
HEAD_ATOL = 1e-6  # personalized head weights, x86 vs aarch64
SIGSEGV_EXITS = (139, -11)  # through a shell, or as the signal number subprocess reports
CORTEX_A72_CPUINFO = (
    "".join(
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
        for i in range(4)
    )
    + "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4 (emulated)\n"
)


def log(msg: str) -> None:
    print(msg, flush=True)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def ensure_host_tools() -> None:
    """qemu-user-static and mmdebstrap from Debian, and qemu registered with binfmt_misc
    (flag F: the kernel opens the interpreter at registration, so it need not be inside the
    chroot), so every aarch64 program the userland starts runs under qemu."""
    if not all(shutil.which(t) for t in ("qemu-aarch64-static", "mmdebstrap", "update-binfmts")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        sh(["apt-get", "install", "-y", "-q", *APT_PACKAGES], env=env, stdout=subprocess.DEVNULL)
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    if not (binfmt / "qemu-aarch64").exists():
        sh(["update-binfmts", "--enable", "qemu-aarch64"])
    flags = (binfmt / "qemu-aarch64").read_text()
    if "flags: " not in flags or "F" not in flags.split("flags: ")[1].split()[0]:
        raise SystemExit(f"qemu-aarch64 is registered without the F flag:\n{flags}")


def ensure_rootfs(cache: Path) -> Path:
    """A Debian bookworm arm64 userland with Python 3.11, built once (mmdebstrap) and reused."""
    rootfs = cache / "rootfs"
    if (rootfs / "usr/bin/python3").exists():
        return rootfs
    partial = cache / "rootfs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    sh(
        ["mmdebstrap", "--arch=arm64", "--variant=essential", f"--include={USERLAND_PACKAGES}", "bookworm"]
        + [str(partial), DEBIAN_MIRROR],
        stdout=subprocess.DEVNULL,
    )
    partial.rename(rootfs)  # only a complete userland is ever reused
    return rootfs


def in_userland(rootfs: Path, cmd: str, qemu_cpu: str, **kw) -> subprocess.CompletedProcess:
    """Run a shell command inside the arm64 userland, in a private mount namespace (its /proc,
    /dev and the fake /proc/cpuinfo vanish with it: nothing to clean up on the host)."""
    (rootfs / "etc/edgetl-cpuinfo").write_text(CORTEX_A72_CPUINFO)
    shutil.copyfile("/etc/resolv.conf", rootfs / "etc/resolv.conf")  # pip reaches PyPI as the host does
    shutil.copyfile(_host_ca_bundle(), rootfs / "etc/edgetl-host-ca.crt")
    env = " ".join(
        [
            "PATH=/opt/venv/bin:/usr/bin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "PIP_CERT=/etc/edgetl-host-ca.crt",
            "PIP_DISABLE_PIP_VERSION_CHECK=1",
            f"QEMU_CPU={qemu_cpu}",
        ]
    )
    r = str(rootfs)
    setup = (
        f"mount -t proc proc {r}/proc && mount -t sysfs sysfs {r}/sys && mount --bind /dev {r}/dev && "
        f"mount --bind {r}/etc/edgetl-cpuinfo {r}/proc/cpuinfo && "
        f'exec chroot {r} /usr/bin/env -i {env} /bin/sh -c "$0"'
    )
    return subprocess.run(["unshare", "--mount", "--fork", "sh", "-c", setup, cmd], **kw)


def _host_ca_bundle() -> str:
    for path in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if path and Path(path).is_file():
            return path
    raise SystemExit("no CA bundle found on the host (set PIP_CERT)")


def source_digest() -> str:
    """What the userland's install and the cached bundle depend on: pyproject and the package."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    for f in sorted((ROOT / "edgetl").rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            digest.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return digest.hexdigest()[:12]


VENVS = {"device": "/opt/venv", "device-onnxruntime": "/opt/venv-onnxruntime"}


def ensure_device_install(rootfs: Path, qemu_cpu: str, digest: str, extra: str = "device") -> None:
    """`pip install "edgetl-*.whl[extra]"` of this checkout in its own venv in the userland
    (every dependency from wheels, for aarch64), redone when the sources change.

    Why not pip's own build of the source tree in there: edgetl is pure Python, its wheel is
    the same on any machine, and building it under emulation (an isolated setuptools
    environment per venv) took minutes. Why --no-compile: byte-compiling every installed
    module in emulated Python is most of an install's time; Python compiles what it imports.
    Only the first venv gets pip (ensurepip is slow under emulation); the others use its pip
    through --python."""
    venv = VENVS[extra]
    stamp = rootfs / venv.lstrip("/") / ".edgetl-installed"
    if stamp.exists() and stamp.read_text() == digest:
        return
    wheels = rootfs / "opt/edgetl-wheel"
    if not (wheels / digest).exists():
        shutil.rmtree(wheels, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(ROOT, f"{tmp}/src", ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build"))
            sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), f"{tmp}/src"])
        (wheels / digest).touch()
    wheel = next(wheels.glob("edgetl-*.whl")).name
    pip = f"{VENVS['device']}/bin/pip"
    create = f"python3 -m venv {venv}" if venv == VENVS["device"] else f"python3 -m venv --without-pip {venv}"
    cmd = (
        f"set -e; [ -x {venv}/bin/python ] || {create}; "
        f"{pip} --python {venv}/bin/python install -q --no-compile --only-binary=:all: --force-reinstall --no-deps "
        f"/opt/edgetl-wheel/{wheel} && {pip} --python {venv}/bin/python install -q --no-compile --only-binary=:all: "
        f"'/opt/edgetl-wheel/{wheel}[{extra}]'"
    )
    try:
        in_userland(rootfs, cmd, qemu_cpu, check=True)
    except subprocess.CalledProcessError:
        shutil.rmtree(rootfs / venv.lstrip("/"), ignore_errors=True)  # the next run starts from a clean venv
        raise
    stamp.write_text(digest)


def onnxruntime_alone(rootfs: Path, stage: str, qemu_cpu: str) -> list[tuple[bool, str]]:
    """A `.[device-onnxruntime]` install on aarch64: no LiteRT, predict and personalize run on
    onnxruntime, and asking for LiteRT names the extra to install."""
    v, b, d = VENVS["device-onnxruntime"] + "/bin", f"{stage}/digits.edgetl", f"{stage}/test.npz"
    script = (
        f"cd /tmp && rm -rf /tmp/ort-only; {v}/python -c 'import ai_edge_litert' 2>/dev/null && echo LITERT-PRESENT; "
        f"{v}/edgetl predict {b} {d} | grep '^# backend'; "
        f"{v}/edgetl personalize {b} --data {d} --store /tmp/ort-only --epochs 3 --margin 1 --forget-margin 1 "
        f">/dev/null 2>&1; echo personalize-exit $?; {v}/edgetl predict {b} {d} --backend litert 2>&1; "
        "echo litert-exit $?"
    )
    out = in_userland(rootfs, script, qemu_cpu, capture_output=True, text=True).stdout
    what = "aarch64 .[device-onnxruntime]:"
    return [
        ("LITERT-PRESENT" not in out, f"{what} ai_edge_litert not installed"),
        ("# backend onnxruntime," in out, f"{what} predict runs on onnxruntime"),
        ("personalize-exit 0" in out, f"{what} personalize exits 0"),
        (
            'pip install "edgetl[device-litert]"' in out and "litert-exit 2" in out,
            f"{what} predict --backend litert exits 2 naming the extra device-litert",
        ),
    ]


def ensure_bundle(cache: Path, digest: str) -> tuple[Path, Path]:
    """A small digits bundle exported on x86 (fp32 + int8, both formats) and its test data,
    reused while the sources are unchanged."""
    out = cache / f"bundle-{digest}"
    bundle, data = out / "digits.edgetl", out / "test.npz"
    if data.exists():
        return bundle, data
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        script = f"""
import os; os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np
from edgetl.data import load_digits_dataset, stratified_split
from edgetl.host._export import export_bundle
from edgetl.host._pretrain import pretrain
from edgetl.host._run import save_run
from edgetl.host._transfer import TrainConfig, train_transfer
source = save_run(pretrain(load_digits_dataset((0, 1, 2, 3, 4)), TrainConfig(backbone="edgetl_cnn", epochs=15, seed=0)),
                  "{tmp}/source", kind="pretrain")
halves = stratified_split(load_digits_dataset((5, 6, 7, 8, 9)), val_fraction=0.0, test_fraction=0.5, seed=0)
run = save_run(train_transfer(halves.train, TrainConfig(backbone=str(source), epochs=60, learning_rate=1e-2,
                                                        val_fraction=0.1, test_fraction=0.0)), "{tmp}/target")
result = export_bundle(run, "{tmp}/digits.edgetl", quantize=["none", "int8"], calibration=halves.train,
                       evaluation=halves.test)
assert result.ok and not result.omitted, result.describe()
t = halves.test
np.savez("{tmp}/test.npz", x=t.x[:100], y=t.y[:100], class_names=np.array(t.class_names))
"""
        sh([sys.executable, "-c", script], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        out.mkdir(parents=True)
        shutil.copytree(f"{tmp}/digits.edgetl", bundle)
        shutil.copyfile(f"{tmp}/test.npz", data)
    return bundle, data


def stage_check_files(rootfs: Path, bundle: Path, data: Path) -> str:
    """The driver, bundle and data inside the userland (fresh each run); returns their directory there."""
    stage = rootfs / "opt/edgetl-check"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copyfile(ROOT / "tools/aarch64_device_run.py", stage / "aarch64_device_run.py")
    shutil.copytree(bundle, stage / bundle.name)
    shutil.copyfile(data, stage / data.name)
    return "/opt/edgetl-check"


def compare(x86: Path, arm: Path) -> list[tuple[bool, str]]:
    """(passed, what) for every command's exit code and every array, x86 against aarch64."""
    checks = []
    for world, out in (("x86", x86), ("aarch64", arm)):
        for run in json.loads((out / "commands.json").read_text()):
            ok = run["returncode"] == 0
            detail = "" if ok else f": {run['stderr_tail'].strip().splitlines()[-1:] or ''}"
            checks.append((ok, f"{world}: edgetl {' '.join(_short(run['args']))} exit {run['returncode']}{detail}"))
    a, b = np.load(x86 / "arrays.npz"), np.load(arm / "arrays.npz")
    if sorted(a.files) != sorted(b.files):
        return checks + [(False, f"arrays differ in kind: x86 {sorted(a.files)}, aarch64 {sorted(b.files)}")]
    for key in sorted(a.files):
        diff = float(np.max(np.abs(a[key].astype(np.float64) - b[key])))
        if key.startswith("probabilities/"):
            checks.append(_top1_check(key, a[key], b[key]))
            if key.endswith("/fp32"):
                checks.append((diff <= FP32_ATOL, f"{key}: max|diff| {diff:.1e} <= {FP32_ATOL:.0e}"))
            else:
                checks.append((True, f"{key}: max|diff| {diff:.1e} (quantized: top-1 is the check)"))
        else:
            checks.append((diff <= HEAD_ATOL, f"{key} (personalized): max|diff| {diff:.1e} <= {HEAD_ATOL:.0e}"))
    return checks


def _top1_check(key: str, x86: np.ndarray, arm: np.ndarray) -> tuple[bool, str]:
    """Top-1 equal on every example, except where one machine's top probability is an exact
    tie: a quantized model's output has 256 levels, and x86 and ARM run different integer
    kernels (onnxruntime: AVX2/VNNI u8s8 vs NEON dot products; measured: 7 of 100 digits
    differ by a level or more in onnxruntime int8), so two classes can land on the same
    level on one machine, where argmax just takes the first. A wrong kernel changes many
    decided examples, and fails."""

    def tied(p: np.ndarray) -> np.ndarray:
        top2 = np.sort(p, axis=1)[:, -2:]
        return top2[:, 0] == top2[:, 1]

    decided = ~(tied(x86) | tied(arm))
    same = x86.argmax(1)[decided] == arm.argmax(1)[decided]
    ties = f"; {int((~decided).sum())} exact ties left out" if not decided.all() else ""
    return bool(same.all()), f"{key}: top-1 equal on {int(same.sum())} of {int(decided.sum())} examples{ties}"


def _short(args: list[str]) -> list[str]:
    return [Path(a).name if "/" in a else a for a in args]


def expected_failure(rootfs: Path, stage: str, qemu_cpu: str) -> tuple[bool, str]:
    """The fix turned off (every LiteRT signature input resized on every call): personalizing
    on LiteRT must crash on aarch64, else this check could not tell the fix from no fix."""
    cmd = (
        f"cd /tmp && python {stage}/aarch64_device_run.py {stage}/digits.edgetl {stage}/test.npz /tmp/nofix "
        "--resize-unchanged-inputs"
    )
    proc = in_userland(rootfs, cmd, qemu_cpu, capture_output=True, text=True)
    crashed = proc.returncode in SIGSEGV_EXITS
    why = (
        ""
        if crashed
        else " (if 0: this LiteRT no longer crashes on 0-d resizes, so this run can no longer show that the fix "
        f"matters; update the check) {proc.stderr.strip()[-300:]}"
    )
    return crashed, (
        f"without the LiteRT scalar fix, personalize --backend litert on aarch64 exits {proc.returncode} "
        f"(expected SIGSEGV: {SIGSEGV_EXITS[0]}){why}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("/var/cache/edgetl-aarch64"), help="userland, venv and bundle")
    p.add_argument("--qemu-cpu", default="cortex-a72", help="QEMU_CPU: the emulated ARM core (a Raspberry Pi 4's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("aarch64_check needs root (apt-get, binfmt_misc, chroot, mounts)")
    args.cache.mkdir(parents=True, exist_ok=True)
    lock = open(args.cache / "lock", "w")  # held until exit: two CI runs on one machine share the cache
    fcntl.flock(lock, fcntl.LOCK_EX)
    times, start = {}, time.perf_counter()

    def step(name: str, fn, *a):
        t = time.perf_counter()
        log(f"== {name}")
        result = fn(*a)
        times[name] = time.perf_counter() - t
        return result

    step("host tools (apt-get: qemu-user-static, mmdebstrap)", ensure_host_tools)
    rootfs = step("arm64 userland (mmdebstrap, cached)", ensure_rootfs, args.cache)
    digest = source_digest()
    step("pip install .[device] in the userland", ensure_device_install, rootfs, args.qemu_cpu, digest)
    install_alone = lambda: ensure_device_install(rootfs, args.qemu_cpu, digest, "device-onnxruntime")  # noqa: E731
    step("pip install .[device-onnxruntime] in the userland", install_alone)
    bundle, data = step("bundle exported on x86 (cached)", ensure_bundle, args.cache, digest)
    stage = stage_check_files(rootfs, bundle, data)
    with tempfile.TemporaryDirectory() as tmp:
        x86 = Path(tmp) / "x86"
        driver = [sys.executable, str(ROOT / "tools/aarch64_device_run.py"), str(bundle), str(data), str(x86)]
        step("device commands on x86", sh, driver)
        arm_cmd = (
            f"rm -rf /tmp/arm && cd /tmp && python {stage}/aarch64_device_run.py {stage}/{bundle.name} "
            f"{stage}/{data.name} /tmp/arm"
        )
        step("device commands on aarch64 (qemu)", lambda: in_userland(rootfs, arm_cmd, args.qemu_cpu, check=True))
        checks = compare(x86, rootfs / "tmp/arm")
    checks += step("onnxruntime alone on aarch64", onnxruntime_alone, rootfs, stage, args.qemu_cpu)
    checks.append(step("expected failure: the fix turned off", expected_failure, rootfs, stage, args.qemu_cpu))
    for ok, what in checks:
        log(f"{'PASS' if ok else 'MISS'}  {what}")
    for name, seconds in times.items():
        log(f"time  {seconds:7.1f} s  {name}")
    missed = sum(not ok for ok, _ in checks)
    log(f"aarch64 check: {len(checks) - missed} PASS, {missed} MISS in {time.perf_counter() - start:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
