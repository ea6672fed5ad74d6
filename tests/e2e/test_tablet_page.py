"""The clinic tablet page, driven in a real headless Chromium against a real uvicorn on loopback.

Each test opens the page served by the app, acts like a clinician (upload, tap points, drag, zoom,
pinch, submit) and reads the answer from the page. The page's numbers are checked against the
API's answer for the same picture and outline, and its outline against the geometry of the taps,
so a wrong coordinate conversion or a wrong displayed value fails here.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; it skips, saying
which is missing, without them. Screenshots go to ``test-artifacts/e2e/``; with
``ANEMIA_UPDATE_SCREENSHOTS=1`` the README's ``docs/images/tablet*.png`` are refreshed too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import httpx
import numpy as np
import pytest

from service.config import Settings, load_settings
from service.startup import BackendFactory
from service.runtime.base import InferenceBackend
from tests.support import CP_ANEMIC_DIR, PROJECT_ROOT
from tests.images import encode, with_exif_orientation
from tests.model_factory import make_test_model, screening_metadata

CHROMIUM = Path(os.environ.get("ANEMIA_E2E_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("ANEMIA_E2E_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS_DIR = PROJECT_ROOT / "test-artifacts" / "e2e"
DOCS_IMAGES_DIR = PROJECT_ROOT / "docs" / "images"
CP_ANEMIC_IMAGE = CP_ANEMIC_DIR / "Anemic" / "Image_001.png"
API_KEY = "clinic-tablet-e2e-key"
METRICS_TOKEN = "clinic-tablet-e2e-metrics"  # with a key set, /metrics wants its own token
# The screen model's made-up operating point (tests/model_factory.py: sensitivity 0.90, specificity 0.48),
# in the page's words: 1 - 0.48 = 0.52 of the others are flagged.
SCREEN_ACCURACY = "This screen finds about 9 in 10 anemic children and wrongly flags about 5 in 10 others."
SCREEN_ACCURACY_DETAIL = "sensitivity 90% (82–95%), specificity 48% (40–57%)"
UNKNOWN_ACCURACY = "The screen's accuracy is not known for this model."
LANDSCAPE = (1280, 800)  # CSS pixels of a 10-inch tablet held sideways
PORTRAIT = (800, 1280)
WAIT_SECONDS = 15.0

pytestmark = pytest.mark.slow

if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
    pytest.skip(
        "headless browser test needs {} and {} (apt-get install chromium chromium-driver)".format(CHROMIUM, CHROMEDRIVER),
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install selenium)")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.interaction import POINTER_TOUCH  # noqa: E402
from selenium.webdriver.common.actions.pointer_actions import PointerActions  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# ---------------------------------------------------------------------------------------------
# A real server and a real browser


class LiveServer:
    def __init__(self, url: str) -> None:
        self.url = url

    def predict(self, image: bytes, filename: str, roi: Optional[Dict[str, Any]] = None) -> httpx.Response:
        data = {"roi": json.dumps(roi)} if roi is not None else {}
        return httpx.post(
            self.url + "/v1/predict",
            files={"image": (filename, image, "application/octet-stream")},
            data=data,
            headers={"X-API-Key": API_KEY},
            timeout=30.0,
        )


@contextlib.contextmanager
def serve(settings: Settings, factory: Optional[BackendFactory] = None) -> Iterator[LiveServer]:
    """Run the real app under uvicorn on a free loopback port until the block ends; over HTTPS,
    behind the service's own edge protocol, when ``settings`` name a certificate."""
    import uvicorn

    from service.app import create_app
    from service.edge import EdgeLimits, tls_context, tls_protocol_class

    app = create_app(settings, factory)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; uvicorn serves on this socket
    port = sock.getsockname()[1]
    options: Dict[str, Any] = {}
    scheme, verify = "http", None  # type: Tuple[str, Any]
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        context = tls_context(str(settings.tls_certfile), str(settings.tls_keyfile))
        options["http"] = tls_protocol_class(EdgeLimits.from_settings(settings), context)
        scheme, verify = "https", ssl.create_default_context(cafile=str(settings.tls_certfile))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = "{}://127.0.0.1:{}".format(scheme, port)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1.0, verify=verify if verify is not None else True).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise AssertionError("uvicorn did not become ready at {} within {} s".format(url, WAIT_SECONDS))
            time.sleep(0.05)
        yield LiveServer(url)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def screen_model(tmp_path_factory: pytest.TempPathFactory, pictures: Dict[str, Path]) -> Path:
    """The test model with an operating point, its threshold between the red and the pale eyelid.

    So one server gives both outcomes: the whole red photo on one side, the pale one on the other.
    """
    import onnxruntime as ort

    from service.model_info import INPUT_NAME, ModelInfo
    from service.preprocess import PreprocessLimits, preprocess_roi

    directory = tmp_path_factory.mktemp("screen-model")
    plain = make_test_model(directory / "plain.onnx")
    spec = ModelInfo.from_onnx(plain).spec
    session = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    probabilities = []
    for name in ("jpeg", "pale"):
        tensor = preprocess_roi(pictures[name].read_bytes(), None, spec, PreprocessLimits()).tensor
        probabilities.append(float(session.run(None, {INPUT_NAME: tensor})[0].reshape(-1)[0]))
    assert abs(probabilities[0] - probabilities[1]) > 0.002, probabilities  # a clear margin on each side
    threshold = round(sum(probabilities) / 2, 6)
    return make_test_model(directory / "screen.onnx", threshold=threshold, extra_metadata=screening_metadata(threshold))


@pytest.fixture(scope="module")
def live_server(screen_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = load_settings(
        model=screen_model, engine_dir=tmp_path_factory.mktemp("screen-engines"), auto_build=True,
        api_key=API_KEY, intra_op_threads=1,
    )
    with serve(settings) as server:
        yield server


class BusyServer(LiveServer):
    def __init__(self, url: str, gate: threading.Event) -> None:
        super().__init__(url)
        self.gate = gate  # cleared: inference waits, so requests pile up

    def requests_in_flight(self) -> float:
        metrics = httpx.get(self.url + "/metrics", headers={"Authorization": "Bearer " + METRICS_TOKEN}, timeout=5.0)
        for line in metrics.text.splitlines():
            if line.startswith("anemia_requests_in_flight "):
                return float(line.split()[1])
        raise AssertionError("/metrics has no anemia_requests_in_flight")


@pytest.fixture(scope="module")
def busy_server(model_path: Path, engine_dir: Path) -> Iterator[BusyServer]:
    """A server that takes at most queue_size + max_batch = 2 requests, with a gate on inference."""
    from service.model_info import ModelInfo
    from service.startup import backend_factory, resolve_engine
    from tests.backends import InstrumentedBackend

    settings = load_settings(
        model=model_path, engine_dir=engine_dir, api_key=API_KEY, metrics_token=METRICS_TOKEN, intra_op_threads=1, queue_size=1, max_batch=1
    )
    inner = backend_factory(settings, resolve_engine(settings, ModelInfo.from_onnx(model_path)))
    gate = threading.Event()
    gate.set()  # open for the warm-up

    def gated(worker: int = 0) -> InferenceBackend:
        return InstrumentedBackend(inner(worker), gate=gate)

    with serve(settings, gated) as server:
        busy = BusyServer(server.url, gate)
        try:
            yield busy
        finally:
            gate.set()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    profile_dir = tempfile.mkdtemp(prefix="anemia-e2e-chromium-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--force-device-scale-factor=1",
        "--window-size={},{}".format(*LANDSCAPE),
        "--user-data-dir={}".format(profile_dir),
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        set_viewport(driver, *LANDSCAPE)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile_dir, ignore_errors=True)


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Size the window so the page's viewport (what a tablet shows) is width x height CSS pixels."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    driver.set_window_size(width + (width - inner[0]), height + (height - inner[1]))
    # Headless Chromium applies a resize asynchronously; a late one would refit the photo between
    # the test reading the view and tapping, so wait until the page sees the final size.
    WebDriverWait(driver, WAIT_SECONDS).until(
        lambda d: d.execute_script("return [window.innerWidth, window.innerHeight];") == [width, height]
    )


# ---------------------------------------------------------------------------------------------
# Page helpers


def open_page(driver: Any, server: LiveServer, key: Optional[str]) -> None:
    """Load the page with a clean local storage holding ``key`` (None: no key saved)."""
    driver.get(server.url + "/")
    driver.execute_script(
        "localStorage.clear(); if (arguments[0]) { localStorage.setItem('anemia.apiKey', arguments[0]); }", key
    )
    driver.refresh()
    wait_for(driver, lambda d: d.find_element(By.ID, "service-status").get_attribute("data-state") != "unknown")


def wait_for(driver: Any, condition: Any, what: str = "the page") -> Any:
    try:
        return WebDriverWait(driver, WAIT_SECONDS).until(condition)
    except TimeoutException:
        save_screenshot(driver, "timeout")
        raise AssertionError("timed out waiting for {}".format(what)) from None


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.execute_script("return document.getElementById(arguments[0]).textContent;", element_id)).strip()


def is_hidden(driver: Any, element_id: str) -> bool:
    return bool(driver.execute_script("return document.getElementById(arguments[0]).hidden;", element_id))


def upload(driver: Any, path: Path) -> None:
    """Choose ``path`` in the file picker; return once the page shows it (or says it cannot)."""
    # Blank the two places the page reports to, so an earlier photo cannot satisfy the wait.
    driver.execute_script("document.getElementById('photo-info').textContent = '';"
                          "document.getElementById('error').hidden = true;")
    driver.find_element(By.ID, "file-input").send_keys(str(path))
    wait_for(driver, lambda d: text_of(d, "photo-info").startswith(path.name) or not is_hidden(d, "error"),
             "the page to show {}".format(path.name))
    if is_hidden(driver, "error"):
        # Taps are placed from the view transform: let any pending re-layout settle first.
        previous: List[Any] = [None]

        def view_settled(d: Any) -> bool:
            current = page_view(d)
            settled = current == previous[0]
            previous[0] = current
            return settled

        WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.05).until(view_settled)


def canvas_rect(driver: Any) -> Dict[str, float]:
    return dict(driver.execute_script(
        "var r = document.getElementById('canvas').getBoundingClientRect();"
        "return {left: r.left, top: r.top, width: r.width, height: r.height};"
    ))


def page_view(driver: Any) -> Dict[str, float]:
    return dict(driver.execute_script("return window.anemiaPage.view();"))


def page_roi(driver: Any) -> Optional[Dict[str, List[Any]]]:
    return driver.execute_script("return window.anemiaPage.roi();")


def natural_to_viewport(driver: Any, point: Sequence[float]) -> Tuple[int, int]:
    """Where a natural image pixel is on screen, from the page's view transform."""
    rect, view = canvas_rect(driver), page_view(driver)
    return (
        int(round(rect["left"] + point[0] * view["scale"] + view["ox"])),
        int(round(rect["top"] + point[1] * view["scale"] + view["oy"])),
    )


def viewport_to_natural_fit(rect: Dict[str, float], size: Tuple[int, int], x: float, y: float) -> Tuple[float, float]:
    """The test's own conversion for the initial 'fit' view: the photo scaled to fit and centred."""
    width, height = size
    scale = min(rect["width"] / width, rect["height"] / height)
    ox = (rect["width"] - width * scale) / 2
    oy = (rect["height"] - height * scale) / 2
    return ((x - rect["left"] - ox) / scale, (y - rect["top"] - oy) / scale)


def tap(driver: Any, x: int, y: int) -> None:
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(x, y).click()
    actions.perform()


def drag(driver: Any, start: Tuple[int, int], end: Tuple[int, int], steps: int = 4) -> None:
    actions = ActionBuilder(driver)
    pointer = actions.pointer_action.move_to_location(*start).pointer_down()
    for step in range(1, steps + 1):
        pointer.move_to_location(
            int(round(start[0] + (end[0] - start[0]) * step / steps)),
            int(round(start[1] + (end[1] - start[1]) * step / steps)),
        )
    pointer.pointer_up()
    actions.perform()


def pinch(driver: Any, center: Tuple[int, int], from_gap: int, to_gap: int, steps: int = 5) -> None:
    """Two touch fingers on a horizontal line through ``center``, moving from one gap to another."""
    # W3C actions run tick by tick: the i-th action of each finger happens together.
    actions = ActionBuilder(driver, mouse=PointerInput(POINTER_TOUCH, "finger1"))
    finger1 = actions.pointer_action
    finger2 = PointerActions(actions.add_pointer_input(POINTER_TOUCH, "finger2"))
    cx, cy = center
    finger1.move_to_location(cx - from_gap // 2, cy).pointer_down()
    finger2.move_to_location(cx + from_gap // 2, cy).pointer_down()
    for step in range(1, steps + 1):
        gap = from_gap + (to_gap - from_gap) * step // steps
        finger1.move_to_location(cx - gap // 2, cy)
        finger2.move_to_location(cx + gap // 2, cy)
    finger1.pointer_up()
    finger2.pointer_up()
    actions.perform()


def submit_and_wait(driver: Any) -> str:
    """Press Check; return 'result' or 'error', whichever the page shows."""
    driver.execute_script("document.getElementById('result').hidden = true; document.getElementById('error').hidden = true;")
    button = driver.find_element(By.ID, "submit")
    assert button.is_enabled(), "the Check button is disabled: " + text_of(driver, "submit-hint")
    button.click()
    return str(wait_for(
        driver,
        lambda d: ("result" if not is_hidden(d, "result") else "error" if not is_hidden(d, "error") else False),
        "a result or an error",
    ))


def read_result(driver: Any) -> Dict[str, Any]:
    result = driver.find_element(By.ID, "result")
    shown = text_of(driver, "result-probability")
    assert shown.endswith("%"), shown
    roi_text = result.get_attribute("data-roi")
    return {
        "probability_attr": float(result.get_attribute("data-probability")),
        "probability_shown_percent": float(shown[:-1]),
        "label_attr": result.get_attribute("data-label"),
        "label_text": text_of(driver, "result-label"),
        "accuracy_text": text_of(driver, "result-accuracy"),
        "accuracy_detail": text_of(driver, "result-accuracy-detail"),
        "roi_text": text_of(driver, "result-roi"),
        "engine_text": text_of(driver, "result-engine"),
        "latency_text": text_of(driver, "result-latency"),
        "roi": json.loads(roi_text) if roi_text else None,
        "full_text": result.text,
        "announced": text_of(driver, "announce"),
    }


def assert_result_matches_api(shown: Dict[str, Any], api: Dict[str, Any], accuracy: str = SCREEN_ACCURACY) -> None:
    # The page shows one decimal of a percentage: it must be the API's value, rounded.
    assert abs(shown["probability_shown_percent"] - api["anemia_probability"] * 100.0) <= 0.05 + 1e-9, (shown, api)
    # Batch composition can move the last float bits; anything beyond that is a different input.
    assert shown["probability_attr"] == pytest.approx(api["anemia_probability"], abs=1e-5)
    assert shown["label_attr"] == api["label"]
    expected_words = "Possible anemia:" if api["label"] == "anemic" else "No anemia detected by the screen:"
    assert shown["label_text"].startswith(expected_words), shown["label_text"]
    # A screen does not rule anemia out: no verdict of "not anemic" anywhere, read or heard.
    assert "not anemic" not in shown["full_text"].lower() and "not anemic" not in shown["announced"].lower()
    # Next to every result: what the screen's measured accuracy means, from /v1/model.
    assert shown["accuracy_text"] == accuracy, shown["accuracy_text"]
    assert accuracy in shown["announced"]
    assert "{:.1f}%".format(api["threshold"] * 100) in shown["label_text"]
    assert "{} / {}".format(api["precision"], api["backend"]) == shown["engine_text"]
    assert "{:,}".format(api["roi"]["pixels"]) in shown["roi_text"]
    assert "A screening aid — confirm with a hemoglobin test" in shown["full_text"]
    # Screen readers hear the number, the label and the caution from the polite live region.
    assert shown["announced"].startswith("Anemia probability {:.1f}%".format(shown["probability_shown_percent"]))
    assert shown["label_text"] in shown["announced"] and "hemoglobin test" in shown["announced"]
    assert "round trip" in shown["latency_text"] and "server" in shown["latency_text"]


def save_screenshot(driver: Any, name: str, docs_name: Optional[str] = None) -> Path:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS_DIR / (name + ".png")
    driver.save_screenshot(str(path))
    if docs_name and os.environ.get("ANEMIA_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES_DIR / docs_name)
    return path


# ---------------------------------------------------------------------------------------------
# Pictures made in code


def eye_photo(
    width: int = 640, height: int = 480, seed: int = 3, band: Tuple[float, float, float] = (200, 82, 92)
) -> np.ndarray:
    """An RGB 'photo' of a pulled-down lower eyelid: skin, white of the eye, a conjunctiva band (red by default)."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = (196, 146, 118)  # skin
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = width / 2, height * 0.42
    eye = ((xx - cx) / (width * 0.36)) ** 2 + ((yy - cy) / (height * 0.2)) ** 2 <= 1.0
    image[eye] = (236, 232, 228)
    iris = ((xx - cx) ** 2 + (yy - cy) ** 2) <= (height * 0.13) ** 2
    image[iris] = (92, 64, 44)
    shade = 0.85 + 0.3 * (xx / width)
    inside = ((xx - cx) / (width * 0.3)) ** 2 + ((yy - height * 0.68) / (height * 0.08)) ** 2 <= 1.0
    image[inside] = np.stack([band[0] * shade, band[1] * shade, band[2] * shade], axis=-1)[inside]
    image += rng.normal(0, 4, size=image.shape)  # some sensor noise; more only bloats the screenshots
    return np.clip(image, 0, 255).astype(np.uint8)


# A 1x1 GIF: the browser opens it, the server does not accept GIF.
GIF_1X1 = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    directory = tmp_path_factory.mktemp("e2e-pictures")
    paths = {
        "jpeg": directory / "eyelid.jpg",
        "text": directory / "notes.txt",
        "gif": directory / "tiny.gif",
    }
    jpeg = encode(eye_photo(), ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])
    paths["jpeg"].write_bytes(jpeg)
    # A pale conjunctiva, the sign of anemia the screen looks for.
    paths["pale"] = directory / "pale-eyelid.jpg"
    paths["pale"].write_bytes(encode(eye_photo(band=(236, 190, 186)), ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]))
    # What a tablet camera held upright writes: landscape pixels plus "rotate 90° clockwise".
    paths["rotated"] = directory / "upright.jpg"
    paths["rotated"].write_bytes(with_exif_orientation(jpeg, 6))
    paths["text"].write_text("Hb 10.2 g/dL, child 3 years\n")
    paths["gif"].write_bytes(GIF_1X1)
    return paths


# ---------------------------------------------------------------------------------------------
# Tests


def test_access_key_is_asked_for_once_and_kept(browser: Any, live_server: LiveServer) -> None:
    open_page(browser, live_server, key=None)
    wait_for(browser, lambda d: d.find_element(By.ID, "service-status").get_attribute("data-state") == "key",
             "the page to ask for an access key")
    assert browser.find_element(By.ID, "settings").get_attribute("open") is not None
    key_input = browser.find_element(By.ID, "api-key")
    label = browser.find_element(By.CSS_SELECTOR, "label[for='api-key']")
    assert "Access key" in label.text
    key_input.send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type='submit']").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "service-status").get_attribute("data-state") == "ready",
             "the service to accept the key")
    assert browser.execute_script("return localStorage.getItem('anemia.apiKey');") == API_KEY
    browser.refresh()  # kept across reloads: entered once per tablet
    wait_for(browser, lambda d: d.find_element(By.ID, "service-status").get_attribute("data-state") == "ready",
             "the saved key to be used after a reload")
    assert text_of(browser, "key-status") == "A key is saved on this device."
    assert API_KEY not in browser.find_element(By.TAG_NAME, "body").text


def test_cp_anemic_crop_goes_straight_through(browser: Any, live_server: LiveServer) -> None:
    if not CP_ANEMIC_IMAGE.is_file():
        pytest.skip("CP-AnemiC image {} is absent (../shared/data not mounted)".format(CP_ANEMIC_IMAGE))
    open_page(browser, live_server, key=API_KEY)
    upload(browser, CP_ANEMIC_IMAGE)
    assert "already cut out" in text_of(browser, "photo-info")
    assert page_roi(browser) is None  # nothing drawn: the server uses the PNG's alpha
    status = submit_and_wait(browser)
    assert status == "result", text_of(browser, "error")
    shown = read_result(browser)
    api = live_server.predict(CP_ANEMIC_IMAGE.read_bytes(), CP_ANEMIC_IMAGE.name)
    assert api.status_code == 200, api.text
    body = api.json()
    assert body["roi"]["source"] == "alpha"
    assert shown["roi"] is None
    assert "transparent background" in shown["roi_text"]
    assert_result_matches_api(shown, body)
    save_screenshot(browser, "cp_anemic_crop_result")


def test_jpeg_polygon_drawn_by_taps(browser: Any, live_server: LiveServer, pictures: Dict[str, Path]) -> None:
    size = (640, 480)
    open_page(browser, live_server, key=API_KEY)
    upload(browser, pictures["jpeg"])
    assert "640 × 480" in text_of(browser, "photo-info")
    assert browser.find_element(By.ID, "submit").is_enabled() is False  # no outline yet

    # Tap five points around the red band, at screen positions chosen in natural pixels.
    wanted = [(140.0, 300.0), (320.0, 285.0), (500.0, 300.0), (450.0, 362.0), (190.0, 362.0)]
    rect = canvas_rect(browser)
    taps = [natural_to_viewport(browser, p) for p in wanted]
    for x, y in taps:
        tap(browser, x, y)
    roi = page_roi(browser)
    assert roi is not None and len(roi["polygon"]) == 5
    # The page's natural-pixel outline equals the test's own conversion of the tapped positions.
    for (x, y), got in zip(taps, roi["polygon"]):
        expected = viewport_to_natural_fit(rect, size, x, y)
        assert got == pytest.approx(list(expected), abs=0.01)

    # Drag the third point 40 px right and 20 px down; Undo puts it back.
    view = page_view(browser)
    drag(browser, taps[2], (taps[2][0] + 40, taps[2][1] + 20))
    moved = page_roi(browser)["polygon"][2]
    assert moved == pytest.approx([roi["polygon"][2][0] + 40 / view["scale"], roi["polygon"][2][1] + 20 / view["scale"]], abs=0.01)
    browser.find_element(By.ID, "undo").click()
    assert page_roi(browser) == roi

    # Zooming with + keeps the natural point under the stage's centre where it was.
    centre = (rect["width"] / 2, rect["height"] / 2)
    before = browser.execute_script("return window.anemiaPage.toNatural(arguments[0], arguments[1]);", *centre)
    browser.find_element(By.ID, "zoom-in").click()
    zoomed = page_view(browser)
    assert zoomed["scale"] == pytest.approx(1.5 * zoomed["fitScale"])
    after = browser.execute_script("return window.anemiaPage.toNatural(arguments[0], arguments[1]);", *centre)
    assert after == pytest.approx(before, abs=1e-6)
    # A two-finger pinch outwards zooms in further and adds no point.
    pinch(browser, (int(rect["left"] + centre[0]), int(rect["top"] + centre[1])), 100, 200)
    pinched = page_view(browser)
    assert pinched["scale"] == pytest.approx(zoomed["scale"] * 2, rel=0.05)
    assert page_roi(browser) == roi
    browser.find_element(By.ID, "zoom-fit").click()
    assert page_view(browser)["scale"] == pytest.approx(zoomed["fitScale"])

    status = submit_and_wait(browser)
    assert status == "result", text_of(browser, "error")
    shown = read_result(browser)
    assert shown["roi"] == roi  # the page reports the outline it sent
    api = live_server.predict(pictures["jpeg"].read_bytes(), "eyelid.jpg", roi)
    assert api.status_code == 200, api.text
    body = api.json()
    assert body["roi"]["source"] == "polygon"
    assert_result_matches_api(shown, body)
    # The outline must matter: the whole photo scores differently, so a lost ROI would show up.
    whole = live_server.predict(pictures["jpeg"].read_bytes(), "eyelid.jpg").json()
    assert abs(whole["anemia_probability"] - body["anemia_probability"]) > 1e-4
    save_screenshot(browser, "jpeg_polygon_result_landscape", docs_name="tablet.png")

    set_viewport(browser, *PORTRAIT)
    try:
        wait_for(browser, lambda d: canvas_rect(d)["width"] < PORTRAIT[0], "the portrait layout")
        assert page_roi(browser) == roi  # rotating the tablet keeps the outline
        browser.execute_script("document.getElementById('check-section').scrollIntoView({block: 'end'});")
        save_screenshot(browser, "jpeg_polygon_portrait", docs_name="tablet-portrait.png")
    finally:
        set_viewport(browser, *LANDSCAPE)


def test_exif_rotated_camera_photo_uses_upright_pixels(
    browser: Any, live_server: LiveServer, pictures: Dict[str, Path]
) -> None:
    open_page(browser, live_server, key=API_KEY)
    upload(browser, pictures["rotated"])
    # Stored 640 x 480 with orientation 6: the browser and the server both see it 480 x 640.
    assert "480 × 640" in text_of(browser, "photo-info")
    # A quadrilateral reaching y = 600, which exists only in the upright picture.
    wanted = [(60.0, 120.0), (420.0, 140.0), (440.0, 600.0), (80.0, 580.0)]
    for point in wanted:
        tap(browser, *natural_to_viewport(browser, point))
    roi = page_roi(browser)
    assert roi is not None
    for want, got in zip(wanted, roi["polygon"]):
        assert got == pytest.approx(list(want), abs=1.0 / page_view(browser)["scale"])
    assert submit_and_wait(browser) == "result", text_of(browser, "error")
    shown = read_result(browser)
    body = live_server.predict(pictures["rotated"].read_bytes(), "upright.jpg", roi).json()
    assert_result_matches_api(shown, body)
    # The server filled the same polygon: its bounding box is the polygon's (within the pixel
    # rasterization includes at the edges), nothing clipped away by a sideways frame.
    xs = [p[0] for p in roi["polygon"]]
    ys = [p[1] for p in roi["polygon"]]
    x, y, w, h = body["roi"]["bbox"]
    assert abs(x - min(xs)) <= 2 and abs(y - min(ys)) <= 2
    assert abs(x + w - max(xs)) <= 2 and abs(y + h - max(ys)) <= 2, (body["roi"], roi)


def test_errors_are_explained_in_plain_words(browser: Any, live_server: LiveServer, pictures: Dict[str, Path]) -> None:
    open_page(browser, live_server, key=API_KEY)

    # Not a picture at all: the tablet says so before anything is sent.
    upload(browser, pictures["text"])
    assert not is_hidden(browser, "error")
    assert browser.find_element(By.ID, "error").get_attribute("role") == "alert"
    assert text_of(browser, "error-title") == "This file is not a picture the tablet can open."
    assert "choose a PNG, JPEG, WebP or BMP" in text_of(browser, "error-next")
    assert not browser.find_element(By.ID, "submit").is_enabled()

    # A picture the browser shows but the server refuses (GIF): the server's 415, in plain words.
    upload(browser, pictures["gif"])
    browser.find_element(By.ID, "whole-photo").click()
    assert submit_and_wait(browser) == "error"
    assert browser.find_element(By.ID, "error").get_attribute("data-code") == "unsupported_image"
    assert text_of(browser, "error-title") == "The server could not read this file as a picture."
    assert "Use a PNG, JPEG, WebP or BMP photo" in text_of(browser, "error-next")

    # A box far too small to hold a conjunctiva: the server's invalid_roi, with what to do next.
    upload(browser, pictures["jpeg"])
    browser.find_element(By.CSS_SELECTOR, "input[name='mode'][value='box']").click()
    start = natural_to_viewport(browser, (300.0, 320.0))
    drag(browser, start, (start[0] + 10, start[1] + 10), steps=2)
    roi = page_roi(browser)
    assert roi is not None and "bbox" in roi
    assert (roi["bbox"][2] + 1) * (roi["bbox"][3] + 1) < 256  # below the server's min_roi_pixels
    assert submit_and_wait(browser) == "error"
    assert browser.find_element(By.ID, "error").get_attribute("data-code") == "invalid_roi"
    assert "too small" in text_of(browser, "error-title")
    assert "drag a larger box" in text_of(browser, "error-next")
    assert "Request " in text_of(browser, "error-detail")
    save_screenshot(browser, "error_roi_too_small")

    # A wrong saved key: the page says a key is needed and opens the key form.
    browser.execute_script("localStorage.setItem('anemia.apiKey', 'wrong-key');")
    browser.refresh()
    wait_for(browser, lambda d: d.find_element(By.ID, "service-status").get_attribute("data-state") == "key",
             "the page to flag the wrong key at load")
    upload(browser, pictures["jpeg"])
    for point in [(140.0, 300.0), (500.0, 300.0), (320.0, 362.0)]:
        tap(browser, *natural_to_viewport(browser, point))
    assert submit_and_wait(browser) == "error"
    assert browser.find_element(By.ID, "error").get_attribute("data-code") == "unauthorized"
    assert "access key" in text_of(browser, "error-title")
    assert browser.find_element(By.ID, "settings").get_attribute("open") is not None


def test_busy_server_is_explained_and_the_photo_is_kept(
    browser: Any, busy_server: BusyServer, pictures: Dict[str, Path]
) -> None:
    photo = pictures["jpeg"].read_bytes()
    open_page(browser, busy_server, key=API_KEY)
    upload(browser, pictures["jpeg"])
    for point in [(140.0, 300.0), (500.0, 300.0), (320.0, 362.0)]:
        tap(browser, *natural_to_viewport(browser, point))
    roi = page_roi(browser)
    busy_server.gate.clear()
    blockers: List[threading.Thread] = []
    try:
        # Fill the server: one request held in inference, one in the queue. A request that lands
        # before the worker has taken the first one off the queue is turned away, so add more
        # until two are in flight.
        deadline = time.monotonic() + WAIT_SECONDS
        while busy_server.requests_in_flight() < 2:
            assert time.monotonic() < deadline, "two blocking requests never got in flight"
            if sum(b.is_alive() for b in blockers) < 2:
                blockers.append(threading.Thread(target=busy_server.predict, args=(photo, "eyelid.jpg")))
                blockers[-1].start()
            time.sleep(0.1)
        assert submit_and_wait(browser) == "error"
        assert browser.find_element(By.ID, "error").get_attribute("data-code") == "overloaded"
        assert text_of(browser, "error-title") == "The service is busy with other checks right now."
        assert text_of(browser, "error-next") == "Wait 1 second, then press Check again."  # from Retry-After
        save_screenshot(browser, "error_server_busy")
    finally:
        busy_server.gate.set()
        for blocker in blockers:
            blocker.join(timeout=WAIT_SECONDS)
    # Nothing to redo: the same photo and outline go through once the server has room.
    assert page_roi(browser) == roi
    assert submit_and_wait(browser) == "result", text_of(browser, "error")
    assert read_result(browser)["roi"] == roi


def check_whole_photo(driver: Any, server: LiveServer, picture: Path, accuracy: str) -> Dict[str, Any]:
    """Upload ``picture``, use the whole photo, press Check; compare with the API; return what was shown."""
    upload(driver, picture)
    driver.find_element(By.ID, "whole-photo").click()
    assert submit_and_wait(driver) == "result", text_of(driver, "error")
    shown = read_result(driver)
    body = server.predict(picture.read_bytes(), picture.name).json()
    assert body["roi"]["source"] == "full"
    assert_result_matches_api(shown, body, accuracy)
    return shown


def test_both_outcomes_are_worded_as_a_screen_with_its_accuracy(
    browser: Any, live_server: LiveServer, pictures: Dict[str, Path]
) -> None:
    open_page(browser, live_server, key=API_KEY)
    outcomes = {}
    for name in ("jpeg", "pale"):
        shown = check_whole_photo(browser, live_server, pictures[name], SCREEN_ACCURACY)
        outcomes[shown["label_attr"]] = shown
        assert shown["accuracy_detail"].startswith("S" + SCREEN_ACCURACY_DETAIL[1:] + ". Measured on grouped out-of-fold")
        assert "427 photographs" in shown["accuracy_detail"]  # where it was measured, from /v1/model
        if shown["label_attr"] == "non-anemic":
            save_screenshot(browser, "no_anemia_detected_result")
    assert set(outcomes) == {"anemic", "non-anemic"}  # the screen model's threshold sits between the two
    assert outcomes["anemic"]["label_text"].startswith("Possible anemia: ")
    assert outcomes["non-anemic"]["label_text"].startswith("No anemia detected by the screen: ")


def test_accuracy_is_said_to_be_unknown_or_not_to_apply(
    browser: Any, model_path: Path, engine_dir: Path, screen_model: Path, pictures: Dict[str, Path],
    tmp_path: Path,
) -> None:
    # A model that carries no operating point (an older export): the page does not invent one.
    plain = load_settings(model=model_path, engine_dir=engine_dir, api_key=API_KEY, intra_op_threads=1)
    with serve(plain) as server:
        open_page(browser, server, key=API_KEY)
        shown = check_whole_photo(browser, server, pictures["jpeg"], UNKNOWN_ACCURACY)
        assert shown["accuracy_detail"] == "Not measured for this model."
    # ANEMIA_THRESHOLD moves the threshold: the figures measured at the model's own do not apply.
    overridden = load_settings(
        model=screen_model, engine_dir=tmp_path / "engines", auto_build=True, api_key=API_KEY, intra_op_threads=1,
        threshold=0.3,
    )
    with serve(overridden) as server:
        open_page(browser, server, key=API_KEY)
        check_whole_photo(
            browser, server, pictures["jpeg"],
            "This server uses its own threshold (30.0%), so the screen's measured accuracy does not apply to this result.",
        )
        assert "not this one: " + SCREEN_ACCURACY_DETAIL in text_of(browser, "result-accuracy-detail")
    # Another precision than the FP32 the figures were measured with: they may not hold either.
    quantized = load_settings(
        model=screen_model, engine_dir=tmp_path / "engines", auto_build=True, api_key=API_KEY, intra_op_threads=1,
        precision="fp16",
    )
    with serve(quantized) as server:
        open_page(browser, server, key=API_KEY)
        check_whole_photo(
            browser, server, pictures["jpeg"],
            "This server runs the FP16 engine; the screen's accuracy was measured for FP32 and may differ for this result.",
        )
        assert text_of(browser, "result-accuracy-detail").startswith("Measured for FP32: " + SCREEN_ACCURACY_DETAIL + ". Measured on ")


def test_page_basics_for_touch_and_screen_readers(browser: Any, live_server: LiveServer) -> None:
    open_page(browser, live_server, key=API_KEY)
    report = browser.execute_script(
        """
        var out = {unlabelled: [], small: [], external: []};
        document.querySelectorAll('input, button, select, textarea').forEach(function (el) {
          var named = el.labels && el.labels.length || el.getAttribute('aria-label') || (el.textContent || '').trim();
          if (!named) { out.unlabelled.push(el.id || el.outerHTML.slice(0, 60)); }
        });
        document.querySelectorAll('button, label.button, .mode, summary, .check').forEach(function (el) {
          var r = el.getBoundingClientRect();
          if (r.width && (r.height < 48 || r.width < 48)) { out.small.push((el.id || el.textContent.trim()) + ' ' + r.width + 'x' + r.height); }
        });
        document.querySelectorAll('script[src], link[href], img[src]').forEach(function (el) {
          var url = new URL(el.getAttribute('src') || el.getAttribute('href'), location.href);
          if (url.origin !== location.origin) { out.external.push(url.href); }
        });
        out.live = document.getElementById('announce').getAttribute('aria-live');
        out.alert = document.getElementById('error').getAttribute('role');
        out.lang = document.documentElement.lang;
        out.camera = document.getElementById('camera-input').getAttribute('capture');
        out.accept = document.getElementById('camera-input').getAttribute('accept');
        return out;
        """
    )
    assert report["unlabelled"] == []
    assert report["small"] == []  # touch targets of at least 48 CSS px
    assert report["external"] == []  # no CDN, no web fonts: clinics may be offline
    assert report["live"] == "polite" and report["alert"] == "alert" and report["lang"] == "en"
    assert report["camera"] == "environment" and report["accept"] == "image/*"
    # The stylesheet and script come from the service itself.
    for asset in ("/static/app.js", "/static/style.css"):
        response = httpx.get(live_server.url + asset, timeout=5.0)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    # Body text contrast on the page background (WCAG AA wants at least 4.5:1).
    colours = browser.execute_script(
        "var b = getComputedStyle(document.querySelector('.panel'));"
        "var h = getComputedStyle(document.querySelector('.hint'));"
        "return [b.backgroundColor, getComputedStyle(document.body).color, h.color];"
    )
    background = parse_rgb(colours[0])
    for foreground in colours[1:]:
        assert contrast_ratio(parse_rgb(foreground), background) >= 4.5, colours


def parse_rgb(css: str) -> Tuple[float, float, float]:
    values = css[css.index("(") + 1 : css.index(")")].split(",")
    return (float(values[0]), float(values[1]), float(values[2]))


def contrast_ratio(a: Tuple[float, float, float], b: Tuple[float, float, float]) -> float:
    def luminance(rgb: Tuple[float, float, float]) -> float:
        channels = []
        for value in rgb:
            c = value / 255.0
            channels.append(c / 12.92 if c <= 0.03928 else math.pow((c + 0.055) / 1.055, 2.4))
        return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]

    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def spki_sha256_base64(certfile: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list pins: the key's SHA-256, base64."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(certfile.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_the_page_works_over_https_with_the_generated_certificate(
    screen_model: Path, tmp_path_factory: pytest.TempPathFactory, pictures: Dict[str, Path]
) -> None:
    """The deployments' default: HTTPS with the box's self-signed certificate, which the tablet
    pins (here: Chromium pins its key, as a tablet trusting that one certificate would)."""
    from service.credentials import ensure_credentials

    credentials = ensure_credentials(tmp_path_factory.mktemp("credentials"), names=["127.0.0.1", "localhost"])
    settings = load_settings(
        model=screen_model, engine_dir=tmp_path_factory.mktemp("tls-engines"), auto_build=True, api_key=API_KEY,
        intra_op_threads=1, tls_certfile=credentials.certfile, tls_keyfile=credentials.keyfile,
    )
    profile_dir = tempfile.mkdtemp(prefix="anemia-e2e-chromium-tls-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
        "--window-size={},{}".format(*LANDSCAPE), "--user-data-dir={}".format(profile_dir),
        "--ignore-certificate-errors-spki-list={}".format(spki_sha256_base64(credentials.certfile)),
    ):
        options.add_argument(flag)
    with serve(settings) as server:
        assert server.url.startswith("https://")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            set_viewport(driver, *LANDSCAPE)
            open_page(driver, server, key=API_KEY)
            assert driver.execute_script("return location.protocol;") == "https:"
            upload(driver, pictures["jpeg"])
            for point in [(140.0, 300.0), (500.0, 300.0), (320.0, 362.0)]:
                tap(driver, *natural_to_viewport(driver, point))
            assert submit_and_wait(driver) == "result", text_of(driver, "error")
        finally:
            driver.quit()
            shutil.rmtree(profile_dir, ignore_errors=True)
