"""Install what the non-Python client tests (tests/clients/) need, into a cache, when missing.

* Node: onnxruntime-node from npm, installed with ``ONNXRUNTIME_NODE_INSTALL=skip``: its install
  script otherwise downloads optional CUDA files from outside npm and fails without internet;
  the CPU binaries are in the npm package itself.
* C++: the onnxruntime C/C++ API headers and the nlohmann/json header, from Debian's packages
  ``libonnxruntime-dev`` and ``nlohmann-json3-dev`` (suite trixie: bookworm has no onnxruntime).
  They are downloaded with ``apt-get download`` into the cache and unpacked there, never
  installed system-wide; the program links against the ``libonnxruntime.so`` of the
  onnxruntime wheel (the C API is backward compatible: a program built with headers of API
  version N runs on any library of version >= N).

After the first run everything comes from the cache (``EDGETL_CLIENT_CACHE``, default
``~/.cache/edgetl/clients``), so the tests also run offline. ``.ci/run`` calls this script; the
tests call the same functions and skip, with the reason, only when an install is impossible.

Usage: ``python tools/client_deps.py [node] [cpp]`` (both when none is named).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ONNXRUNTIME_NODE = ("onnxruntime-node", "1.30.0")
DEBIAN_SUITE = "trixie"
DEBIAN_PACKAGES = ("libonnxruntime-dev", "nlohmann-json3-dev")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class ClientDepsError(RuntimeError):
    """A client dependency could not be installed; the message says what was tried."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGETL_CLIENT_CACHE") or Path.home() / ".cache" / "edgetl" / "clients")


def _run(cmd: list[str], what: str, env: dict | None = None, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClientDepsError(f"{what}: `{' '.join(cmd)}` failed to run ({exc})") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ClientDepsError(f"{what}: `{' '.join(cmd)}` exited {done.returncode}: " + " | ".join(tail))
    return done.stdout


def apt_install(packages: list[str], why: str) -> None:
    """Install the machine's own Debian packages (as root), or say why not."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClientDepsError(f"{why}: install Debian's {' '.join(packages)} (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], "apt-get update", env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], f"{why}: apt-get install", env)


def ensure_node() -> str:
    """The ``node`` executable; on a machine without one, Debian's ``nodejs``."""
    if not (shutil.which("node") and shutil.which("npm")):
        apt_install(["nodejs", "npm"], "no node/npm on PATH")
    return shutil.which("node") or "node"


def ensure_cpp_toolchain() -> str:
    """``g++`` and OpenSSL's headers (the guide's C++ checks sha256 with libcrypto)."""
    if not (shutil.which("g++") and Path("/usr/include/openssl/evp.h").is_file()):
        apt_install(["g++", "libssl-dev"], "no g++ or OpenSSL headers")
    return shutil.which("g++") or "g++"


def node_prefix() -> Path:
    """A directory whose ``node_modules`` holds onnxruntime-node (installed there if missing)."""
    name, version = ONNXRUNTIME_NODE
    prefix = cache_dir() / "node"
    package = prefix / "node_modules" / name / "package.json"
    if package.is_file() and json.loads(package.read_text()).get("version") == version:
        return prefix
    ensure_node()
    npm = shutil.which("npm")
    if not npm:
        raise ClientDepsError("`npm` is not on PATH (Debian: apt-get install npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    cmd = [npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(prefix), f"{name}@{version}"]
    _run(cmd, f"installing {name}@{version} from npm", env)
    if not package.is_file():
        raise ClientDepsError(f"npm reported success but {package} is missing")
    return prefix


def _apt_options(root: Path) -> list[str]:
    """apt-get options that use a private sources list and state: the system's apt is untouched."""
    sources = root / "sources.list"
    sources.write_text(f"deb [signed-by={DEBIAN_KEYRING}] http://deb.debian.org/debian {DEBIAN_SUITE} main\n")
    for sub in ("lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "status").touch()
    return [
        f"-o=Dir::Etc::SourceList={sources}",
        "-o=Dir::Etc::SourceParts=/dev/null",
        f"-o=Dir::State::Lists={root / 'lists'}",
        f"-o=Dir::Cache={root / 'cache'}",
        f"-o=Dir::State::status={root / 'status'}",
        "-o=APT::Sandbox::User=root" if os.geteuid() == 0 else "-o=Debug::NoDropPrivs=1",
        "-qq",
    ]


def cpp_include_dirs() -> list[Path]:
    """Include directories with ``onnxruntime_cxx_api.h`` and ``nlohmann/json.hpp`` (fetched if missing)."""
    root = cache_dir() / "cpp"
    include = root / "usr" / "include"
    wanted = (include / "onnxruntime" / "onnxruntime_cxx_api.h", include / "nlohmann" / "json.hpp")
    if all(p.is_file() for p in wanted):
        return [include / "onnxruntime", include]
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise ClientDepsError(f"fetching the C++ headers needs `{tool}` (a Debian machine); not found")
    if not DEBIAN_KEYRING.is_file():
        raise ClientDepsError(f"fetching the C++ headers needs Debian's archive keyring at {DEBIAN_KEYRING}")
    with tempfile.TemporaryDirectory(prefix="edgetl-apt-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        options = _apt_options(work)
        _run(["apt-get", *options, "update"], f"reading Debian {DEBIAN_SUITE}'s package lists")
        debs = work / "debs"
        debs.mkdir()
        os.chmod(debs, 0o777)  # apt's download sandbox user must be able to write here
        # apt-get download writes into the current directory.
        _run(
            ["apt-get", *options, "download", *DEBIAN_PACKAGES],
            "apt-get download " + " ".join(DEBIAN_PACKAGES),
            cwd=debs,
        )
        found = sorted(debs.glob("*.deb"))
        if len(found) != len(DEBIAN_PACKAGES):
            raise ClientDepsError(f"apt-get download gave {[d.name for d in found]}, expected {DEBIAN_PACKAGES}")
        root.mkdir(parents=True, exist_ok=True)
        for deb in found:
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
            (root / f"{deb.stem}.fetched").write_text(deb.name + "\n")
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        raise ClientDepsError(f"the Debian packages did not contain {missing}")
    return [include / "onnxruntime", include]


def ort_api_version(include_dirs: list[Path]) -> int:
    """``ORT_API_VERSION`` of the fetched headers (the oldest library they work with)."""
    text = (include_dirs[0] / "onnxruntime_c_api.h").read_text(errors="replace")
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not match:
        raise ClientDepsError("onnxruntime_c_api.h has no ORT_API_VERSION")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    wanted = (argv if argv is not None else sys.argv[1:]) or ["node", "cpp"]
    unknown = set(wanted) - {"node", "cpp"}
    if unknown:
        print(f"unknown client(s) {sorted(unknown)}; choose from node, cpp", file=sys.stderr)
        return 2
    status = 0
    for client in wanted:
        try:
            if client == "node":
                where = node_prefix() / "node_modules" / ONNXRUNTIME_NODE[0]
            else:
                ensure_cpp_toolchain()
                dirs = cpp_include_dirs()
                where = f"{dirs[0]} (ORT_API_VERSION {ort_api_version(dirs)})"
            print(f"{client}: {where}")
        except ClientDepsError as exc:
            print(f"{client}: not installed: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
