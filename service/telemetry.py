"""Jetson telemetry: run ``tegrastats``, parse its lines and export them as Prometheus gauges.

``tegrastats`` (part of L4T) prints one line per interval. The fields are documented in the
"Tegrastats Utility" appendix of the L4T Development Guide
(https://docs.nvidia.com/jetson/archives/l4t-archived/l4t-325/Tegra%20Linux%20Driver%20Package%20Development%20Guide/AppendixTegraStats.html):
``RAM X/YMB (lfb NxZMB)``, ``SWAP X/YMB (cached ZMB)``, ``CPU [X%@F,off,...]``, ``EMC_FREQ X%@F``,
``GR3D_FREQ X%@F``, ``<zone>@<T>C`` temperatures and ``<RAIL> cur/avg`` power rails.

The two platforms this service targets print it differently:

* TX2 NX, JetPack 4.6 (L4T R32.7): no timestamp; rails are ``VDD_IN 5326/4870`` (milliwatts,
  no unit); rail names ``VDD_IN``, ``VDD_CPU_GPU``, ``VDD_SOC``; zones ``PLL``, ``MCPU``, ``BCPU``,
  ``GPU``, ``Tboard``, ``Tdiode``, ``PMIC``, ``thermal``.
* Xavier NX, JetPack 5.x (L4T R35): lines start with ``MM-DD-YYYY HH:MM:SS``; rails carry units,
  ``VDD_IN 6245mW/5120mW``; rail names ``VDD_IN``, ``VDD_CPU_GPU_CV``, ``VDD_SOC``; zones ``AUX``,
  ``CPU``, ``GPU``, ``AO``, ``PMIC``, ``thermal``; ``GR3D_FREQ`` may show per-GPC clocks in brackets
  (``46%@[1100]``) or no clock at all.

Fields that need root (``EMC_FREQ`` on some releases) or that a board lacks are simply absent from
the line; the parser exports what is there and never guesses.

Exported gauges (all prefixed ``anemia_jetson_``; SI base units, ratios in 0..1):

========================================  =================  ===========================================
name                                      labels             meaning
========================================  =================  ===========================================
anemia_jetson_gpu_load_ratio              -                  GR3D (GPU) busy fraction
anemia_jetson_gpu_frequency_hertz         -                  GPU clock (first GPC when several)
anemia_jetson_cpu_load_ratio              core               per-core busy fraction (offline cores absent)
anemia_jetson_cpu_frequency_hertz         core               per-core clock (offline cores absent)
anemia_jetson_cpu_online                  core               1 when the core is powered, 0 when ``off``
anemia_jetson_emc_load_ratio              -                  external memory controller busy fraction
anemia_jetson_ram_used_bytes              -                  RAM in use (CPU and GPU share it)
anemia_jetson_ram_total_bytes             -                  RAM available to applications
anemia_jetson_swap_used_bytes             -                  swap in use
anemia_jetson_swap_total_bytes            -                  swap size
anemia_jetson_temperature_celsius         zone               each thermal zone, zone name lower-cased
anemia_jetson_power_watts                 rail               instantaneous rail power
anemia_jetson_tegrastats_up               -                  1 while tegrastats runs and its lines parse
anemia_jetson_tegrastats_last_sample_timestamp_seconds  -    Unix time of the last parsed line
anemia_jetson_tegrastats_parse_errors_total  -               lines that could not be parsed
========================================  =================  ===========================================

Wiring (the app does this when ``ANEMIA_TEGRASTATS=1``)::

    telemetry = TegrastatsMonitor(registry)  # interval_ms=1000 by default
    telemetry.start()      # raises TelemetryError when tegrastats is not installed
    ...
    telemetry.stop()
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

LOGGER = logging.getLogger(__name__)

PREFIX = "anemia_jetson_"
MEBIBYTE_BYTES = 1024 * 1024
KIBIBYTE_BYTES = 1024
MEGAHERTZ_HERTZ = 1_000_000.0
MILLIWATT_WATTS = 0.001

_UNIT_BYTES = {"kB": KIBIBYTE_BYTES, "KB": KIBIBYTE_BYTES, "MB": MEBIBYTE_BYTES, "GB": 1024 * MEBIBYTE_BYTES}

_TIMESTAMP = re.compile(r"^\s*\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2}\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)(kB|KB|MB|GB)")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)(kB|KB|MB|GB)")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
# "GR3D_FREQ 46%@1100", "46%@[1100]", "46%@[1100,1100]" or "46%" (no clock shown)
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+)(?:,\d+)*\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
# Temperatures: "GPU@38.5C", "thermal@37.45C", "tj@49.5C"; CPU@-256C means "sensor absent".
_TEMPERATURE = re.compile(r"(?<![\w%])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
# Rails: "VDD_IN 5326/4870" (JetPack 4) or "VDD_IN 6245mW/5120mW" (JetPack 5);
# older boards name some "POM_5V_IN 2545/2547".
_RAIL = re.compile(r"\b((?:VDD|POM|VIN)_[A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?")
# tegrastats reports an absent thermal sensor as -256C (it reads the zone's error value).
_ABSENT_SENSOR_CELSIUS = -256.0


class TelemetryError(Exception):
    """tegrastats cannot run; the message says what to do."""


@dataclass
class TegrastatsSample:
    """One parsed tegrastats line, in SI units. Missing fields stay None / empty."""

    ram_used_bytes: Optional[int] = None
    ram_total_bytes: Optional[int] = None
    swap_used_bytes: Optional[int] = None
    swap_total_bytes: Optional[int] = None
    cpu_load_ratio: Dict[str, float] = field(default_factory=dict)
    cpu_frequency_hertz: Dict[str, float] = field(default_factory=dict)
    cpu_online: Dict[str, bool] = field(default_factory=dict)
    gpu_load_ratio: Optional[float] = None
    gpu_frequency_hertz: Optional[float] = None
    emc_load_ratio: Optional[float] = None
    temperature_celsius: Dict[str, float] = field(default_factory=dict)
    power_watts: Dict[str, float] = field(default_factory=dict)


def _bytes(value: str, unit: str) -> int:
    return int(value) * _UNIT_BYTES[unit]


def parse_tegrastats_line(line: str) -> TegrastatsSample:
    """Parse one tegrastats line of either format; ValueError when it is not a tegrastats line."""
    text = _TIMESTAMP.sub("", line.strip())
    sample = TegrastatsSample()

    ram = _RAM.search(text)
    if ram:
        sample.ram_used_bytes = _bytes(ram.group(1), ram.group(3))
        sample.ram_total_bytes = _bytes(ram.group(2), ram.group(3))
    swap = _SWAP.search(text)
    if swap:
        sample.swap_used_bytes = _bytes(swap.group(1), swap.group(3))
        sample.swap_total_bytes = _bytes(swap.group(2), swap.group(3))

    cpu = _CPU.search(text)
    if cpu:
        for index, token in enumerate(part.strip() for part in cpu.group(1).split(",")):
            core = str(index)
            if token == "off":
                sample.cpu_online[core] = False
                continue
            match = _CPU_CORE.match(token)
            if match is None:
                raise ValueError("unrecognised CPU entry {!r} in tegrastats line".format(token))
            sample.cpu_online[core] = True
            sample.cpu_load_ratio[core] = int(match.group(1)) / 100.0
            if match.group(2) is not None:
                sample.cpu_frequency_hertz[core] = int(match.group(2)) * MEGAHERTZ_HERTZ

    gr3d = _GR3D.search(text)
    if gr3d:
        sample.gpu_load_ratio = int(gr3d.group(1)) / 100.0
        if gr3d.group(2) is not None:
            sample.gpu_frequency_hertz = int(gr3d.group(2)) * MEGAHERTZ_HERTZ
    emc = _EMC.search(text)
    if emc:
        sample.emc_load_ratio = int(emc.group(1)) / 100.0

    for zone, celsius in _TEMPERATURE.findall(text):
        value = float(celsius)
        if value <= _ABSENT_SENSOR_CELSIUS:
            continue
        sample.temperature_celsius[zone.lower()] = value

    for rail, current_mw, _average_mw in _RAIL.findall(text):
        # tegrastats' average runs since tegrastats started; Prometheus averages over any window itself.
        sample.power_watts[rail] = int(current_mw) * MILLIWATT_WATTS

    if sample.ram_used_bytes is None and gr3d is None and not sample.cpu_online:
        raise ValueError("not a tegrastats line: {!r}".format(line[:120]))
    return sample


class TegrastatsMonitor(Collector):
    """Runs ``tegrastats --interval N`` in a thread and exposes its latest line as gauges.

    It is a custom collector (not a set of Gauge objects) so that per-core, per-zone and per-rail
    series come and go with what the board reports, and a scrape always sees one consistent line.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        interval_ms: int = 1000,
        command: Optional[Sequence[str]] = None,
        restart_delay_seconds: float = 5.0,
    ) -> None:
        if interval_ms < 10:
            raise ValueError("interval_ms must be at least 10 (tegrastats' own minimum), got {}".format(interval_ms))
        self.interval_ms = interval_ms
        self._command: List[str] = list(command) if command is not None else ["tegrastats", "--interval", str(interval_ms)]
        self._restart_delay_seconds = restart_delay_seconds
        self._lock = threading.Lock()
        self._sample: Optional[TegrastatsSample] = None
        self._last_sample_unix_seconds: Optional[float] = None
        self._parse_errors = 0
        self._running = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._process: Optional["subprocess.Popen[str]"] = None
        registry.register(self)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start tegrastats in a daemon thread; TelemetryError when the executable is missing."""
        if self._thread is not None:
            return
        executable = self._command[0]
        if shutil.which(executable) is None:
            raise TelemetryError(
                "ANEMIA_TEGRASTATS=1 but {!r} is not on PATH; it ships with L4T on Jetson (/usr/bin/tegrastats). "
                "In a container, mount it from the host (see deploy/compose.yaml) or unset ANEMIA_TEGRASTATS".format(executable)
            )
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tegrastats", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop tegrastats and join the reader thread (idempotent)."""
        self._stop.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_seconds)
        if self._thread is not None:
            self._thread.join(timeout=timeout_seconds)
            self._thread = None
        with self._lock:
            self._running = False

    def update(self, line: str) -> bool:
        """Parse one line and make it the current sample; False (and a counted error) when it does not parse."""
        try:
            sample = parse_tegrastats_line(line)
        except ValueError as exc:
            with self._lock:
                self._parse_errors += 1
            LOGGER.debug("tegrastats: %s", exc)
            return False
        with self._lock:
            self._sample = sample
            self._last_sample_unix_seconds = time.time()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._process = subprocess.Popen(
                    self._command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                    universal_newlines=True,
                    bufsize=1,
                )
            except OSError as exc:
                LOGGER.warning("tegrastats could not start (%s); retrying in %.0f s", exc, self._restart_delay_seconds)
                self._stop.wait(self._restart_delay_seconds)
                continue
            with self._lock:
                self._running = True
            assert self._process.stdout is not None
            for line in self._process.stdout:
                self.update(line)
                if self._stop.is_set():
                    break
            self._process.wait()
            with self._lock:
                self._running = False
            if not self._stop.is_set():
                LOGGER.warning(
                    "tegrastats exited with status %s; restarting in %.0f s", self._process.returncode, self._restart_delay_seconds
                )
                self._stop.wait(self._restart_delay_seconds)

    # ---- prometheus ------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        # Declaring the names lets the registry reject a clash at registration time.
        return list(self._families(None, None, 0, False))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            sample, last, errors, running = self._sample, self._last_sample_unix_seconds, self._parse_errors, self._running
        return list(self._families(sample, last, errors, running))

    def _families(
        self, sample: Optional[TegrastatsSample], last_unix_seconds: Optional[float], parse_errors: int, running: bool
    ) -> Iterator[Metric]:
        def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, documentation, labels=list(labels) if labels else None)

        up = gauge("tegrastats_up", "1 while tegrastats runs and its last line parsed")
        fresh = sample is not None and running
        up.add_metric([], 1.0 if fresh else 0.0)
        yield up
        last = gauge("tegrastats_last_sample_timestamp_seconds", "Unix time of the last parsed tegrastats line")
        if last_unix_seconds is not None:
            last.add_metric([], last_unix_seconds)
        yield last
        errors = CounterMetricFamily(PREFIX + "tegrastats_parse_errors", "tegrastats lines that could not be parsed")
        errors.add_metric([], float(parse_errors))
        yield errors

        scalars = (
            ("gpu_load_ratio", "GPU (GR3D) busy fraction, 0..1", "gpu_load_ratio"),
            ("gpu_frequency_hertz", "GPU clock", "gpu_frequency_hertz"),
            ("emc_load_ratio", "External memory controller busy fraction, 0..1", "emc_load_ratio"),
            ("ram_used_bytes", "RAM in use (shared by CPU and GPU)", "ram_used_bytes"),
            ("ram_total_bytes", "RAM available to applications", "ram_total_bytes"),
            ("swap_used_bytes", "Swap in use", "swap_used_bytes"),
            ("swap_total_bytes", "Swap size", "swap_total_bytes"),
        )
        for name, documentation, attribute in scalars:
            family = gauge(name, documentation)
            value = getattr(sample, attribute) if sample is not None else None
            if value is not None:
                family.add_metric([], float(value))
            yield family

        labelled = (
            ("cpu_load_ratio", "Per-core CPU busy fraction, 0..1 (offline cores absent)", "core", "cpu_load_ratio"),
            ("cpu_frequency_hertz", "Per-core CPU clock (offline cores absent)", "core", "cpu_frequency_hertz"),
            ("cpu_online", "1 when the core is powered, 0 when tegrastats shows it off", "core", "cpu_online"),
            ("temperature_celsius", "Thermal zone temperature", "zone", "temperature_celsius"),
            ("power_watts", "Instantaneous power of a rail", "rail", "power_watts"),
        )
        for name, documentation, label, attribute in labelled:
            family = gauge(name, documentation, (label,))
            values: Dict[str, object] = getattr(sample, attribute) if sample is not None else {}
            for key in sorted(values, key=_natural_key):
                family.add_metric([key], float(values[key]))  # type: ignore[arg-type]
            yield family


def _natural_key(text: str) -> tuple:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)
