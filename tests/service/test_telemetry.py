"""tegrastats parsing and export, on sample lines in the two formats the service meets.

The lines below follow the field layout of the L4T "Tegrastats Utility" appendix
(docs.nvidia.com/jetson/archives/l4t-archived/l4t-325/.../AppendixTegraStats.html) and the output
of the two targeted releases: TX2 NX on JetPack 4.6 (L4T R32.7: no timestamp, rails as bare
milliwatts ``VDD_IN 5326/4870``) and Xavier NX on JetPack 5.1 (L4T R35: a ``MM-DD-YYYY HH:MM:SS``
prefix, rails with units ``VDD_IN 6245mW/5120mW``, GR3D clock in brackets). They are written
here from that layout, not captured from a board in this repository's CI.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.telemetry import (
    MEBIBYTE_BYTES,
    TegrastatsMonitor,
    TelemetryError,
    parse_tegrastats_line,
)
from tests.support import XAVIER_NX_JP51

TX2_NX_JP46 = (
    "RAM 2111/3956MB (lfb 64x4MB) SWAP 0/1978MB (cached 0MB) "
    "CPU [35%@2035,off,off,28%@2035,31%@2035,30%@2035] EMC_FREQ 12%@1866 GR3D_FREQ 61%@1300 "
    "NVENC off NVDEC off APE 150 PLL@41C MCPU@41C PMIC@50C Tboard@36C GPU@39.5C BCPU@41C "
    "thermal@40.35C Tdiode@38.75C VDD_IN 5326/4870 VDD_CPU_GPU 1910/1602 VDD_SOC 1020/990"
)


def test_tx2_nx_jetpack46_line() -> None:
    sample = parse_tegrastats_line(TX2_NX_JP46)
    assert sample.ram_used_bytes == 2111 * MEBIBYTE_BYTES
    assert sample.ram_total_bytes == 3956 * MEBIBYTE_BYTES
    assert sample.swap_total_bytes == 1978 * MEBIBYTE_BYTES
    assert sample.cpu_online == {"0": True, "1": False, "2": False, "3": True, "4": True, "5": True}
    assert sample.cpu_load_ratio == {"0": 0.35, "3": 0.28, "4": 0.31, "5": 0.30}
    assert sample.cpu_frequency_hertz["0"] == 2035e6
    assert sample.gpu_load_ratio == pytest.approx(0.61)
    assert sample.gpu_frequency_hertz == 1300e6
    assert sample.emc_load_ratio == pytest.approx(0.12)
    assert sample.temperature_celsius == {
        "pll": 41.0, "mcpu": 41.0, "pmic": 50.0, "tboard": 36.0, "gpu": 39.5, "bcpu": 41.0,
        "thermal": 40.35, "tdiode": 38.75,
    }
    # current value, not tegrastats' running average; bare numbers are milliwatts on R32
    assert sample.power_watts == pytest.approx({"VDD_IN": 5.326, "VDD_CPU_GPU": 1.910, "VDD_SOC": 1.020})


def test_xavier_nx_jetpack51_line() -> None:
    sample = parse_tegrastats_line(XAVIER_NX_JP51)
    assert sample.ram_used_bytes == 3021 * MEBIBYTE_BYTES
    assert sample.cpu_online == {"0": True, "1": True, "2": True, "3": True, "4": False, "5": False}
    assert sample.cpu_load_ratio["1"] == pytest.approx(0.08)
    assert sample.gpu_load_ratio == pytest.approx(0.46)
    assert sample.gpu_frequency_hertz == 1100e6
    assert sample.temperature_celsius == {
        "aux": 36.5, "cpu": 38.0, "thermal": 37.45, "ao": 36.5, "gpu": 38.5, "pmic": 50.0,
    }
    assert sample.power_watts == pytest.approx({"VDD_IN": 6.245, "VDD_CPU_GPU_CV": 2.130, "VDD_SOC": 1.392})


@pytest.mark.parametrize(
    "gr3d, load_ratio, frequency_hertz",
    [("GR3D_FREQ 0%@[305,305]", 0.0, 305e6), ("GR3D_FREQ 99%", 0.99, None), ("GR3D_FREQ 5%@114", 0.05, 114e6)],
)
def test_gpu_field_variants(gr3d: str, load_ratio: float, frequency_hertz: object) -> None:
    sample = parse_tegrastats_line("RAM 100/200MB (lfb 1x4MB) CPU [1%@100] " + gr3d + " GPU@30C")
    assert sample.gpu_load_ratio == pytest.approx(load_ratio)
    assert sample.gpu_frequency_hertz == frequency_hertz


def test_absent_sensor_and_missing_fields() -> None:
    # Non-root on some releases: no EMC_FREQ; an absent zone reads -256C and must not become a series.
    sample = parse_tegrastats_line("RAM 100/200MB (lfb 1x4MB) CPU [off,3%@729] GR3D_FREQ 0%@76 CV0@-256C GPU@30.5C")
    assert sample.emc_load_ratio is None
    assert sample.swap_total_bytes is None
    assert sample.temperature_celsius == {"gpu": 30.5}
    assert sample.power_watts == {}


@pytest.mark.parametrize("line", ["", "tegrastats: command not found", "some random log line 42"])
def test_rejects_non_tegrastats_lines(line: str) -> None:
    with pytest.raises(ValueError):
        parse_tegrastats_line(line)


def _families(registry: CollectorRegistry) -> dict:
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict, name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError((name, labels))


def test_exported_gauges_follow_the_latest_line() -> None:
    registry = CollectorRegistry()
    telemetry = TegrastatsMonitor(registry, interval_ms=500)
    families = _families(registry)
    assert _value(families, "anemia_jetson_tegrastats_up") == 0.0
    assert families["anemia_jetson_power_watts"].samples == []

    assert telemetry.update(XAVIER_NX_JP51)
    families = _families(registry)
    assert _value(families, "anemia_jetson_gpu_load_ratio") == pytest.approx(0.46)
    assert _value(families, "anemia_jetson_power_watts", rail="VDD_CPU_GPU_CV") == pytest.approx(2.13)
    assert _value(families, "anemia_jetson_temperature_celsius", zone="gpu") == 38.5
    assert _value(families, "anemia_jetson_cpu_online", core="5") == 0.0
    assert _value(families, "anemia_jetson_ram_used_bytes") == 3021 * MEBIBYTE_BYTES

    # A different board's line replaces the rails rather than mixing them.
    assert telemetry.update(TX2_NX_JP46)
    assert not telemetry.update("garbage")
    families = _families(registry)
    rails = {s.labels["rail"] for s in families["anemia_jetson_power_watts"].samples}
    assert rails == {"VDD_IN", "VDD_CPU_GPU", "VDD_SOC"}
    assert _value(families, "anemia_jetson_tegrastats_parse_errors_total") == 1.0


def test_start_without_tegrastats_names_the_fix(tmp_path: Path) -> None:
    telemetry = TegrastatsMonitor(CollectorRegistry(), command=[str(tmp_path / "no-such-tegrastats")])
    with pytest.raises(TelemetryError, match="ANEMIA_TEGRASTATS"):
        telemetry.start()


def test_runs_a_tegrastats_process_and_stops_it(tmp_path: Path) -> None:
    # A stand-in for tegrastats: prints the Xavier NX line every 20 ms until terminated.
    fake = tmp_path / "fake_tegrastats.py"
    fake.write_text(textwrap.dedent(
        """
        import sys, time
        while True:
            print({line!r}, flush=True)
            time.sleep(0.02)
        """
    ).format(line=XAVIER_NX_JP51))
    registry = CollectorRegistry()
    telemetry = TegrastatsMonitor(registry, command=[sys.executable, str(fake)], restart_delay_seconds=0.1)
    telemetry.start()
    try:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            families = _families(registry)
            if _value(families, "anemia_jetson_tegrastats_up") == 1.0:
                break
            time.sleep(0.02)
        assert _value(families, "anemia_jetson_tegrastats_up") == 1.0
        assert _value(families, "anemia_jetson_power_watts", rail="VDD_IN") == pytest.approx(6.245)
        process = telemetry._process
    finally:
        telemetry.stop()
    assert process is not None and process.poll() is not None
    assert _value(_families(registry), "anemia_jetson_tegrastats_up") == 0.0


def test_app_exports_tegrastats_when_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_settings: Any, crop_png: bytes) -> None:
    """ANEMIA_TEGRASTATS=1: the app runs `tegrastats` from PATH and /metrics carries its gauges."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.support import wait_ready

    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\nwhile true; do echo '{}'; sleep 0.02; done\n".format(TX2_NX_JP46))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "{}:{}".format(tmp_path, os.environ.get("PATH", "")))
    with TestClient(create_app(make_settings(tegrastats=True))) as client:
        wait_ready(client)
        deadline = time.monotonic() + 10.0
        families: dict = {}
        while time.monotonic() < deadline:
            families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
            if _value(families, "anemia_jetson_tegrastats_up") == 1.0:
                break
            time.sleep(0.02)
        assert _value(families, "anemia_jetson_tegrastats_up") == 1.0
        assert _value(families, "anemia_jetson_power_watts", rail="VDD_CPU_GPU") == pytest.approx(1.910)
        assert _value(families, "anemia_jetson_temperature_celsius", zone="bcpu") == 41.0
        assert "anemia_ready 1.0" in client.get("/metrics").text
