// Clinic tablet page: take or pick a photo, outline the conjunctiva, call /v1/predict, show the result.
// Plain browser JavaScript (no build step, no libraries) so any clinic can serve it offline.
(function () {
  "use strict";

  var KEY_STORAGE = "anemia.apiKey";
  var REQUEST_TIMEOUT_MS = 30000;
  var HANDLE_RADIUS_PX = 11;       // drawn size of a point, in CSS pixels
  var HIT_RADIUS_PX = 26;          // touch target around a point: a fingertip is ~1 cm
  var TAP_SLOP_PX = 8;             // movement below this is a tap, above it a drag
  var ZOOM_STEP = 1.5;
  var MAX_ZOOM_OVER_FIT = 20;
  var ALPHA_CHECK_MAX_PIXELS = 4000000;  // larger pictures are checked for transparency downscaled

  var $ = function (id) { return document.getElementById(id); };
  var canvas = $("canvas");
  var ctx = canvas.getContext("2d");
  var stage = $("stage");

  var state = {
    file: null,
    image: null,
    imageUrl: null,
    naturalWidth: 0,
    naturalHeight: 0,
    hasAlpha: false,
    mode: "polygon",
    points: [],          // [[x, y], ...] in natural image pixels
    box: null,           // {x, y, w, h} in natural image pixels
    history: [],         // snapshots of {points, box} for Undo
    view: { scale: 1, ox: 0, oy: 0 },  // screen = natural * scale + offset (CSS pixels)
    fitScale: 1,
    userZoomed: false,
    cssWidth: 0,
    cssHeight: 0,
    busy: false,
    hasResult: false,
    model: null,         // the last /v1/model answer: name, sha256, threshold, operating_point
    lastResult: null,    // the last /v1/predict answer, to re-word it when /v1/model arrives late
    generation: 0        // bumped per photo, so a late answer about an earlier photo is dropped
  };

  // ------------------------------------------------------------------------------------------
  // API key: entered once, kept in this browser's local storage.

  function readKey() {
    try { return window.localStorage.getItem(KEY_STORAGE) || ""; } catch (e) { return ""; }
  }

  function writeKey(value) {
    try {
      if (value) { window.localStorage.setItem(KEY_STORAGE, value); } else { window.localStorage.removeItem(KEY_STORAGE); }
    } catch (e) { /* private mode: the key lasts for this page only */ }
    memoryKey = value;
    showKeyStatus();
  }

  var memoryKey = readKey();

  function showKeyStatus() {
    $("key-status").textContent = memoryKey ? "A key is saved on this device." : "No key is saved on this device.";
  }

  function authHeaders() {
    return memoryKey ? { "X-API-Key": memoryKey } : {};
  }

  $("key-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var value = $("api-key").value.trim();
    $("api-key").value = "";
    writeKey(value);
    $("settings").open = false;
    checkService();
  });

  $("forget-key").addEventListener("click", function () {
    $("api-key").value = "";
    writeKey("");
  });

  // ------------------------------------------------------------------------------------------
  // Service status: readiness, and whether this server wants a key we do not have.

  function setServiceStatus(stateName, text) {
    var el = $("service-status");
    el.dataset.state = stateName;
    el.textContent = text;
  }

  function checkService() {
    return fetch("v1/model", { headers: authHeaders(), cache: "no-store" }).then(function (response) {
      if (response.status === 401) {
        setServiceStatus("key", "Access key needed");
        $("settings").open = true;
        return null;
      }
      if (!response.ok) {
        setServiceStatus("down", response.status === 503 ? "Service starting…" : "Service problem (" + response.status + ")");
        return null;
      }
      return response.json().then(function (model) {
        var name = model && (model.name || (model.model && model.model.name));
        setServiceStatus("ready", "Service ready" + (name ? " · " + name : ""));
        return model || null;
      });
    }).catch(function () {
      setServiceStatus("down", "Service not reachable");
      return null;
    }).then(function (model) {
      // What the page says about the screen's accuracy comes from here; unknown when unread.
      state.model = model;
      if (state.hasResult && state.lastResult) { showAccuracy(state.lastResult); }
    });
  }

  // ------------------------------------------------------------------------------------------
  // Loading a photo.

  function onFileChosen(event) {
    var input = event.target;
    var file = input.files && input.files[0];
    // Reset so choosing the same file again still fires "change".
    input.value = "";
    if (file) { loadFile(file); }
  }

  $("camera-input").addEventListener("change", onFileChosen);
  $("file-input").addEventListener("change", onFileChosen);

  function loadFile(file) {
    state.generation += 1;
    hideError();
    clearResult();
    var generation = state.generation;
    var url = URL.createObjectURL(file);
    var image = new Image();
    image.decoding = "async";
    image.onload = function () {
      if (generation !== state.generation) { URL.revokeObjectURL(url); return; }  // a newer pick won
      if (state.imageUrl) { URL.revokeObjectURL(state.imageUrl); }
      // naturalWidth/Height already follow the EXIF orientation (browsers apply it, as the server does).
      state.file = file;
      state.image = image;
      state.imageUrl = url;
      state.naturalWidth = image.naturalWidth;
      state.naturalHeight = image.naturalHeight;
      state.hasAlpha = hasTransparency(image);
      state.points = [];
      state.box = null;
      state.history = [];
      state.userZoomed = false;
      // "Use the whole photo" was a choice about the previous picture, not this one.
      $("whole-photo").checked = false;
      stage.dataset.empty = "false";
      fitView();
      describePhoto();
      updateControls();
      render();
    };
    image.onerror = function () {
      URL.revokeObjectURL(url);
      if (generation !== state.generation) { return; }
      showError({
        title: "This file is not a picture the tablet can open.",
        next: "Take a new photo, or choose a PNG, JPEG, WebP or BMP picture.",
        detail: file.name ? "File: " + file.name : ""
      });
    };
    image.src = url;
  }

  function hasTransparency(image) {
    // Only PNG/WebP/BMP carry alpha that the server reads; JPEG never does.
    var type = (state.file && state.file.type) || "";
    if (type === "image/jpeg") { return false; }
    // Full size where affordable: one see-through pixel is enough for the server to use the alpha.
    var scale = Math.min(1, Math.sqrt(ALPHA_CHECK_MAX_PIXELS / (image.naturalWidth * image.naturalHeight)));
    var w = Math.max(1, Math.round(image.naturalWidth * scale));
    var h = Math.max(1, Math.round(image.naturalHeight * scale));
    var probe = document.createElement("canvas");
    probe.width = w;
    probe.height = h;
    var probeCtx = probe.getContext("2d", { willReadFrequently: true });
    probeCtx.drawImage(image, 0, 0, w, h);
    var data;
    try { data = probeCtx.getImageData(0, 0, w, h).data; } catch (e) { return false; }
    for (var i = 3; i < data.length; i += 4) {
      if (data[i] < 255) { return true; }
    }
    return false;
  }

  function describePhoto() {
    var info = (state.file.name ? state.file.name + " · " : "") + state.naturalWidth + " × " + state.naturalHeight + " pixels";
    if (state.hasAlpha) {
      info += ". This picture is already cut out (transparent background): the server uses it as the outline, no drawing needed.";
    }
    $("photo-info").textContent = info;
  }

  // ------------------------------------------------------------------------------------------
  // View: fit, zoom, pan. Outline coordinates are kept in natural image pixels.

  function resizeCanvas() {
    var rect = stage.getBoundingClientRect();
    var dpr = window.devicePixelRatio || 1;
    var oldCenter = state.image ? toNatural(state.cssWidth / 2, state.cssHeight / 2) : null;
    state.cssWidth = Math.max(1, rect.width);
    state.cssHeight = Math.max(1, rect.height);
    canvas.width = Math.round(state.cssWidth * dpr);
    canvas.height = Math.round(state.cssHeight * dpr);
    if (!state.image) { render(); return; }
    var fit = computeFitScale();
    if (!state.userZoomed) {
      fitView();
    } else {
      // Keep what was in the middle in the middle when the tablet rotates.
      state.fitScale = fit;
      state.view.scale = clampScale(state.view.scale);
      state.view.ox = state.cssWidth / 2 - oldCenter[0] * state.view.scale;
      state.view.oy = state.cssHeight / 2 - oldCenter[1] * state.view.scale;
      clampView();
    }
    render();
  }

  function computeFitScale() {
    return Math.min(state.cssWidth / state.naturalWidth, state.cssHeight / state.naturalHeight);
  }

  function fitView() {
    state.fitScale = computeFitScale();
    state.view.scale = state.fitScale;
    state.view.ox = (state.cssWidth - state.naturalWidth * state.view.scale) / 2;
    state.view.oy = (state.cssHeight - state.naturalHeight * state.view.scale) / 2;
    state.userZoomed = false;
  }

  function clampScale(scale) {
    return Math.min(state.fitScale * MAX_ZOOM_OVER_FIT, Math.max(state.fitScale, scale));
  }

  function clampView() {
    // An image smaller than the stage stays centred; a larger one may not leave a gap at an edge.
    var v = state.view;
    var w = state.naturalWidth * v.scale;
    var h = state.naturalHeight * v.scale;
    v.ox = w <= state.cssWidth ? (state.cssWidth - w) / 2 : Math.min(0, Math.max(state.cssWidth - w, v.ox));
    v.oy = h <= state.cssHeight ? (state.cssHeight - h) / 2 : Math.min(0, Math.max(state.cssHeight - h, v.oy));
  }

  function zoomAbout(cssX, cssY, newScale) {
    var anchor = toNatural(cssX, cssY);
    state.view.scale = clampScale(newScale);
    state.view.ox = cssX - anchor[0] * state.view.scale;
    state.view.oy = cssY - anchor[1] * state.view.scale;
    state.userZoomed = state.view.scale > state.fitScale * 1.0001;
    clampView();
    render();
  }

  function toNatural(cssX, cssY) {
    return [(cssX - state.view.ox) / state.view.scale, (cssY - state.view.oy) / state.view.scale];
  }

  function toScreen(point) {
    return [point[0] * state.view.scale + state.view.ox, point[1] * state.view.scale + state.view.oy];
  }

  function clampToImage(point) {
    return [Math.min(state.naturalWidth, Math.max(0, point[0])), Math.min(state.naturalHeight, Math.max(0, point[1]))];
  }

  $("zoom-in").addEventListener("click", function () {
    zoomAbout(state.cssWidth / 2, state.cssHeight / 2, state.view.scale * ZOOM_STEP);
  });
  $("zoom-out").addEventListener("click", function () {
    zoomAbout(state.cssWidth / 2, state.cssHeight / 2, state.view.scale / ZOOM_STEP);
  });
  $("zoom-fit").addEventListener("click", function () { fitView(); render(); });

  canvas.addEventListener("wheel", function (event) {
    if (!state.image) { return; }
    event.preventDefault();
    var p = eventPoint(event);
    zoomAbout(p[0], p[1], state.view.scale * Math.pow(1.0015, -event.deltaY));
  }, { passive: false });

  // ------------------------------------------------------------------------------------------
  // Outline editing with pointer events (touch, pen and mouse alike).

  var pointers = {};      // pointerId -> [cssX, cssY]
  var gesture = null;

  function eventPoint(event) {
    var rect = canvas.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  }

  function pointerCount() { return Object.keys(pointers).length; }

  function pinchInfo() {
    var ids = Object.keys(pointers);
    var a = pointers[ids[0]], b = pointers[ids[1]];
    return {
      mid: [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2],
      distance: Math.max(1, Math.hypot(a[0] - b[0], a[1] - b[1]))
    };
  }

  function snapshot() {
    return { points: state.points.map(function (p) { return p.slice(); }), box: state.box ? Object.assign({}, state.box) : null };
  }

  function pushHistory() {
    state.history.push(snapshot());
    if (state.history.length > 200) { state.history.shift(); }
  }

  function nearestVertex(cssPoint) {
    var best = -1, bestDistance = HIT_RADIUS_PX;
    state.points.forEach(function (p, index) {
      var s = toScreen(p);
      var d = Math.hypot(s[0] - cssPoint[0], s[1] - cssPoint[1]);
      if (d <= bestDistance) { best = index; bestDistance = d; }
    });
    return best;
  }

  function boxCorners(box) {
    return [[box.x, box.y], [box.x + box.w, box.y], [box.x + box.w, box.y + box.h], [box.x, box.y + box.h]];
  }

  function nearestCorner(cssPoint) {
    if (!state.box) { return -1; }
    var best = -1, bestDistance = HIT_RADIUS_PX;
    boxCorners(state.box).forEach(function (p, index) {
      var s = toScreen(p);
      var d = Math.hypot(s[0] - cssPoint[0], s[1] - cssPoint[1]);
      if (d <= bestDistance) { best = index; bestDistance = d; }
    });
    return best;
  }

  function boxFrom(a, b) {
    return { x: Math.min(a[0], b[0]), y: Math.min(a[1], b[1]), w: Math.abs(a[0] - b[0]), h: Math.abs(a[1] - b[1]) };
  }

  canvas.addEventListener("pointerdown", function (event) {
    if (!state.image || state.busy) { return; }
    if (event.pointerType === "mouse" && event.button !== 0) { return; }
    event.preventDefault();
    try { canvas.setPointerCapture(event.pointerId); } catch (e) { /* synthetic pointers */ }
    var p = eventPoint(event);
    pointers[event.pointerId] = p;
    if (pointerCount() === 2) {
      // A second finger turns whatever started into a pinch; undo a half-drawn change.
      if (gesture && gesture.before && gesture.moved) { restore(gesture.before); state.history.pop(); }
      var info = pinchInfo();
      gesture = { type: "pinch", start: info, scale: state.view.scale, anchor: toNatural(info.mid[0], info.mid[1]) };
      return;
    }
    if (pointerCount() > 2) { return; }
    var editable = !state.hasAlpha && !$("whole-photo").checked;
    var before = snapshot();
    if (editable && state.mode === "polygon") {
      var vertex = nearestVertex(p);
      gesture = vertex >= 0
        ? { type: "vertex", index: vertex, start: p, moved: false, before: before }
        : { type: "tap", start: p, moved: false, view: Object.assign({}, state.view) };
    } else if (editable && state.mode === "box") {
      var corner = nearestCorner(p);
      if (corner >= 0) {
        var corners = boxCorners(state.box);
        gesture = { type: "box", anchor: corners[(corner + 2) % 4], start: p, moved: false, before: before };
      } else {
        gesture = { type: "box", anchor: clampToImage(toNatural(p[0], p[1])), start: p, moved: false, before: before };
      }
    } else {
      gesture = { type: "tap", start: p, moved: false, view: Object.assign({}, state.view), panOnly: true };
    }
  });

  canvas.addEventListener("pointermove", function (event) {
    if (!(event.pointerId in pointers) || !gesture) { return; }
    event.preventDefault();
    var p = eventPoint(event);
    pointers[event.pointerId] = p;
    if (gesture.type === "pinch") {
      if (pointerCount() < 2) { return; }
      var info = pinchInfo();
      state.view.scale = clampScale(gesture.scale * info.distance / gesture.start.distance);
      state.view.ox = info.mid[0] - gesture.anchor[0] * state.view.scale;
      state.view.oy = info.mid[1] - gesture.anchor[1] * state.view.scale;
      state.userZoomed = state.view.scale > state.fitScale * 1.0001;
      clampView();
      render();
      return;
    }
    var dx = p[0] - gesture.start[0], dy = p[1] - gesture.start[1];
    if (!gesture.moved && Math.hypot(dx, dy) < TAP_SLOP_PX) { return; }
    if (!gesture.moved) {
      gesture.moved = true;
      if (gesture.before) { pushHistory(); }
    }
    if (gesture.type === "vertex") {
      state.points[gesture.index] = clampToImage(toNatural(p[0], p[1]));
      outlineChanged();
    } else if (gesture.type === "box") {
      state.box = boxFrom(gesture.anchor, clampToImage(toNatural(p[0], p[1])));
      outlineChanged();
    } else if (gesture.type === "tap") {
      // A one-finger drag on empty space pans the zoomed photo.
      state.view.ox = gesture.view.ox + dx;
      state.view.oy = gesture.view.oy + dy;
      clampView();
      render();
    }
  });

  function endPointer(event, cancelled) {
    if (!(event.pointerId in pointers)) { return; }
    delete pointers[event.pointerId];
    if (!gesture) { return; }
    if (gesture.type === "pinch") {
      // Lifting one finger of a pinch must not turn into a tap.
      if (pointerCount() === 0) { gesture = null; }
      return;
    }
    if (!cancelled && gesture.type === "tap" && !gesture.moved && !gesture.panOnly) {
      var natural = toNatural(gesture.start[0], gesture.start[1]);
      if (natural[0] >= 0 && natural[1] >= 0 && natural[0] <= state.naturalWidth && natural[1] <= state.naturalHeight) {
        pushHistory();
        state.points.push(natural);
        outlineChanged();
      }
    }
    if (cancelled && gesture.before && gesture.moved) { restore(gesture.before); state.history.pop(); }
    gesture = null;
    updateControls();
  }

  canvas.addEventListener("pointerup", function (event) { endPointer(event, false); });
  canvas.addEventListener("pointercancel", function (event) { endPointer(event, true); });

  function restore(snap) {
    state.points = snap.points.map(function (p) { return p.slice(); });
    state.box = snap.box ? Object.assign({}, snap.box) : null;
    outlineChanged();
  }

  $("undo").addEventListener("click", function () {
    if (!state.history.length) { return; }
    restore(state.history.pop());
  });

  $("clear").addEventListener("click", function () {
    if (!state.points.length && !state.box) { return; }
    pushHistory();
    state.points = [];
    state.box = null;
    outlineChanged();
  });

  Array.prototype.forEach.call(document.querySelectorAll('input[name="mode"]'), function (radio) {
    radio.addEventListener("change", function () {
      if (radio.checked) { state.mode = radio.value; outlineChanged(); }
    });
  });

  $("whole-photo").addEventListener("change", function () { outlineChanged(); });

  function outlineChanged() {
    if (state.hasResult) { $("result-stale").hidden = false; }
    updateControls();
    render();
  }

  // ------------------------------------------------------------------------------------------
  // The ROI sent to the server, in natural pixels of the uploaded picture.

  function currentRoi() {
    if (!state.image || state.hasAlpha || $("whole-photo").checked) { return null; }
    if (state.mode === "polygon" && state.points.length >= 3) {
      return { polygon: state.points.map(function (p) { return [round2(p[0]), round2(p[1])]; }) };
    }
    if (state.mode === "box" && state.box && state.box.w > 0 && state.box.h > 0) {
      return { bbox: [round2(state.box.x), round2(state.box.y), round2(state.box.w), round2(state.box.h)] };
    }
    return null;
  }

  function round2(value) { return Math.round(value * 100) / 100; }

  function readyToSend() {
    if (!state.image || state.busy) { return false; }
    return state.hasAlpha || $("whole-photo").checked || currentRoi() !== null;
  }

  function updateControls() {
    var loaded = !!state.image;
    var editable = loaded && !state.hasAlpha && !$("whole-photo").checked;
    $("mode-group").disabled = !editable;
    $("whole-photo").disabled = !loaded || state.hasAlpha;
    $("undo").disabled = !editable || state.history.length === 0;
    $("clear").disabled = !editable || (!state.points.length && !state.box);
    ["zoom-in", "zoom-out", "zoom-fit"].forEach(function (id) { $(id).disabled = !loaded; });
    $("submit").disabled = !readyToSend();

    var status, hint;
    if (!loaded) {
      status = "Tap around the pink area to place points; drag a point to move it. Pinch or use + and − to zoom.";
      hint = "Choose a photo first.";
    } else if (state.hasAlpha) {
      status = "No outline needed: the transparent background already marks the eyelid.";
      hint = "Ready to check.";
    } else if ($("whole-photo").checked) {
      status = "The whole photo will be used.";
      hint = "Ready to check.";
    } else if (state.mode === "polygon") {
      var n = state.points.length;
      status = n === 0 ? "Tap around the edge of the pink inner eyelid to place points (at least 3)."
        : n < 3 ? n + (n === 1 ? " point" : " points") + ": place at least " + (3 - n) + " more."
        : n + " points. Drag a point to move it; Undo removes the last change.";
      hint = n >= 3 ? "Ready to check." : "Outline the inner eyelid first (at least 3 points).";
    } else {
      status = state.box
        ? "Box " + Math.round(state.box.w) + " × " + Math.round(state.box.h) + " pixels. Drag a corner to adjust it."
        : "Drag a box around the pink inner eyelid.";
      hint = state.box ? "Ready to check." : "Draw a box around the inner eyelid first.";
    }
    if (state.busy) { hint = "Checking…"; }
    $("outline-status").textContent = status;
    $("submit-hint").textContent = hint;
    canvas.setAttribute("aria-label", loaded
      ? "Photo, " + state.naturalWidth + " by " + state.naturalHeight + " pixels. " + status
      : "No photo yet");
  }

  // ------------------------------------------------------------------------------------------
  // Drawing.

  function render() {
    var dpr = window.devicePixelRatio || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!state.image) { return; }
    var v = state.view;
    if (state.hasAlpha) { drawCheckerboard(dpr); }
    ctx.setTransform(dpr * v.scale, 0, 0, dpr * v.scale, dpr * v.ox, dpr * v.oy);
    ctx.imageSmoothingEnabled = v.scale < 4;
    ctx.drawImage(state.image, 0, 0, state.naturalWidth, state.naturalHeight);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    if (state.hasAlpha || $("whole-photo").checked) { return; }
    if (state.mode === "polygon") { drawPolygon(); } else { drawBox(); }
  }

  function drawCheckerboard(dpr) {
    var v = state.view, size = 12 * dpr;
    var x0 = Math.max(0, v.ox * dpr), y0 = Math.max(0, v.oy * dpr);
    var x1 = Math.min(canvas.width, (v.ox + state.naturalWidth * v.scale) * dpr);
    var y1 = Math.min(canvas.height, (v.oy + state.naturalHeight * v.scale) * dpr);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
    ctx.fillStyle = "#d0d4da";
    for (var y = y0; y < y1; y += size) {
      for (var x = x0 + ((Math.floor((y - y0) / size) % 2) * size); x < x1; x += 2 * size) {
        ctx.fillRect(x, y, Math.min(size, x1 - x), Math.min(size, y1 - y));
      }
    }
  }

  function strokeTwice(width) {
    // A dark line inside a light one stays visible on pale and on dark tissue alike.
    ctx.lineJoin = "round";
    ctx.strokeStyle = "#ffffff";
    ctx.lineWidth = width + 3;
    ctx.stroke();
    ctx.strokeStyle = "#0b4f8a";
    ctx.lineWidth = width;
    ctx.stroke();
  }

  function drawPolygon() {
    var pts = state.points.map(toScreen);
    if (!pts.length) { return; }
    var trace = function () {
      pts.forEach(function (p, i) { if (i === 0) { ctx.moveTo(p[0], p[1]); } else { ctx.lineTo(p[0], p[1]); } });
      if (pts.length >= 3) { ctx.closePath(); }
    };
    if (pts.length >= 3) { dimOutside(trace); }
    ctx.beginPath();
    trace();
    strokeTwice(2.5);
    pts.forEach(function (p, i) { drawHandle(p, i === 0); });
  }

  function drawBox() {
    if (!state.box) { return; }
    var a = toScreen([state.box.x, state.box.y]);
    var b = toScreen([state.box.x + state.box.w, state.box.y + state.box.h]);
    var trace = function () { ctx.rect(a[0], a[1], b[0] - a[0], b[1] - a[1]); };
    dimOutside(trace);
    ctx.beginPath();
    trace();
    strokeTwice(2.5);
    boxCorners(state.box).map(toScreen).forEach(function (p) { drawHandle(p, false); });
  }

  function dimOutside(trace) {
    // Darken what is left out rather than tint what is kept: pallor is judged on true colours.
    var topLeft = toScreen([0, 0]), bottomRight = toScreen([state.naturalWidth, state.naturalHeight]);
    ctx.beginPath();
    ctx.rect(topLeft[0], topLeft[1], bottomRight[0] - topLeft[0], bottomRight[1] - topLeft[1]);
    trace();
    ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
    ctx.fill("evenodd");
  }

  function drawHandle(p, first) {
    ctx.beginPath();
    ctx.arc(p[0], p[1], first ? HANDLE_RADIUS_PX + 2 : HANDLE_RADIUS_PX, 0, Math.PI * 2);
    ctx.fillStyle = first ? "#ffd600" : "#ffffff";
    ctx.fill();
    ctx.lineWidth = 3;
    ctx.strokeStyle = "#0b4f8a";
    ctx.stroke();
  }

  // ------------------------------------------------------------------------------------------
  // Sending and showing the result.

  // What people should read for each error code of the API, and what to do next.
  var ERROR_TEXT = {
    payload_too_large: ["The photo file is too big for the server.",
      "Take the photo again at a lower camera resolution, or choose a smaller file."],
    unsupported_image: ["The server could not read this file as a picture.",
      "Use a PNG, JPEG, WebP or BMP photo, or take a new photo with the camera."],
    image_too_large: ["The photo has more pixels than the server accepts.",
      "Take the photo again at a lower camera resolution, or choose a smaller picture."],
    invalid_roi: ["The outline could not be used: it is too small or outside the photo.",
      "Zoom in and draw a larger outline around the pink inner eyelid (at least 3 points), then press Check again."],
    invalid_request: ["The request was incomplete.",
      "Reload the page and try again. If it keeps happening, tell your technical contact."],
    unauthorized: ["This server needs a valid access key.",
      "Enter the key from your administrator under “Access key” at the top, then press Check again."],
    not_ready: ["The service is still starting.",
      "Wait a few seconds, then press Check again."],
    overloaded: ["The service is busy with other checks right now.",
      "Wait a few seconds, then press Check again. Your photo and outline are kept."],
    inference_failed: ["The model could not process this photo.",
      "Press Check again. If it fails again, tell your technical contact and give them the request number below."],
    request_timeout: ["The photo took too long to reach the server; the network is slow right now.",
      "Move closer to the Wi-Fi, or take the photo at a lower camera resolution, then press Check again."],
    too_many_uploads: ["The server is receiving too many photos at once.",
      "Wait a few seconds, then press Check again. Your photo and outline are kept."],
    too_many_connections: ["The server has too many open connections right now.",
      "Wait a few seconds, then press Check again. If it keeps happening, tell your technical contact."],
    headers_too_large: ["The request was too large for the server to read.",
      "Reload the page and try again. If it keeps happening, tell your technical contact."],
    client_closed: ["The connection to the server was lost while sending the photo.",
      "Check the Wi-Fi, then press Check again."]
  };

  $("submit").addEventListener("click", submit);

  function submit() {
    if (!readyToSend()) { return; }
    var roi = currentRoi();
    var form = new FormData();
    form.append("image", state.file, state.file.name || "photo");
    if (roi) { form.append("roi", JSON.stringify(roi)); }
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timer = controller ? setTimeout(function () { controller.abort(); }, REQUEST_TIMEOUT_MS) : null;
    var started = performance.now();
    var generation = state.generation;
    setBusy(true);
    hideError();
    fetch("v1/predict", {
      method: "POST",
      body: form,
      headers: authHeaders(),
      signal: controller ? controller.signal : undefined
    }).then(function (response) {
      return response.text().then(function (text) {
        if (generation !== state.generation) { return; }  // a new photo was chosen meanwhile
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        if (response.ok && body && typeof body.anemia_probability === "number") {
          showResult(body, roi, performance.now() - started);
        } else {
          showApiError(response, body);
        }
      });
    }).catch(function (error) {
      if (generation !== state.generation) { return; }
      if (error && error.name === "AbortError") {
        showError({ title: "The server did not answer within " + REQUEST_TIMEOUT_MS / 1000 + " seconds.",
          next: "Check the tablet's network connection, then press Check again.", detail: "" });
      } else {
        showError({ title: "The tablet could not reach the screening service.",
          next: "Check that the tablet is on the clinic network (Wi-Fi), then press Check again.", detail: "" });
      }
    }).then(function () {
      if (timer) { clearTimeout(timer); }
      setBusy(false);
    });
  }

  function setBusy(busy) {
    state.busy = busy;
    $("submit").setAttribute("aria-busy", busy ? "true" : "false");
    $("submit").textContent = busy ? "Checking…" : "Check for anemia";
    updateControls();
  }

  function showApiError(response, body) {
    var error = (body && body.error) || {};
    var code = error.code || "";
    var text = ERROR_TEXT[code];
    var retryAfter = response.headers.get("Retry-After");
    var title, next;
    if (text) {
      title = text[0];
      next = text[1];
      if (code === "invalid_roi" && state.mode === "box") {
        next = "Zoom in and drag a larger box around the pink inner eyelid, then press Check again.";
      }
      if ((code === "overloaded" || code === "not_ready") && retryAfter && /^\d+$/.test(retryAfter)) {
        next = "Wait " + retryAfter + (retryAfter === "1" ? " second" : " seconds") + ", then press Check again.";
      }
    } else {
      title = "Something went wrong on the server (HTTP " + response.status + ").";
      next = "Press Check again. If it keeps happening, tell your technical contact.";
    }
    var detail = [];
    if (error.message) { detail.push("Server says: " + error.message); }
    if (body && body.request_id) { detail.push("Request " + body.request_id); }
    showError({ title: title, next: next, detail: detail.join(" · "), code: code || String(response.status) });
    if (code === "unauthorized") {
      setServiceStatus("key", "Access key needed");
      $("settings").open = true;
      $("api-key").focus();
    }
  }

  function showError(err) {
    var box = $("error");
    $("error-title").textContent = err.title;
    $("error-next").textContent = err.next;
    $("error-detail").textContent = err.detail || "";
    $("error-detail").hidden = !err.detail;
    box.dataset.code = err.code || "client";
    box.hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").dataset.code = "";
  }

  function clearResult() {
    state.hasResult = false;
    $("announce").textContent = "";
    $("result").hidden = true;
    $("result-stale").hidden = true;
  }

  function percent(probability) {
    return (probability * 100).toFixed(1) + "%";
  }

  function showResult(body, roi, roundTripMs) {
    var p = body.anemia_probability;
    var threshold = typeof body.threshold === "number" ? body.threshold : 0.5;
    var anemic = body.label === "anemic";
    var result = $("result");
    result.dataset.probability = String(p);
    result.dataset.label = body.label;
    result.dataset.roi = roi ? JSON.stringify(roi) : "";
    result.classList.toggle("is-anemic", anemic);
    $("result-probability").textContent = percent(p);
    // A screen flags or does not flag; it never rules anemia out, so a negative is not a diagnosis.
    $("result-label").textContent = anemic
      ? "Possible anemia: " + percent(p) + " is at or above the " + percent(threshold) + " threshold."
      : "No anemia detected by the screen: " + percent(p) + " is below the " + percent(threshold) + " threshold.";
    $("result-threshold").textContent = percent(threshold);
    state.lastResult = body;
    showAccuracy(body);
    var answered = body.model || {};
    if (!state.model || (answered.sha256 && state.model.sha256 !== answered.sha256)) {
      // The server restarted with another model (or /v1/model was not read yet): the figures
      // shown must be that model's, so ask again; showAccuracy runs once more when it answers.
      checkService();
    }
    var r = body.roi || {};
    var roiNames = { alpha: "transparent background of the picture", polygon: "your outline (points)",
      bbox: "your box", full: "the whole photo" };
    $("result-roi").textContent = (roiNames[r.source] || r.source || "?") +
      (typeof r.pixels === "number" ? " · " + r.pixels.toLocaleString() + " pixels" : "");
    var m = body.model || {};
    $("result-model").textContent = [m.name, m.version ? "v" + m.version : ""].filter(Boolean).join(" ") || "?";
    $("result-engine").textContent = (body.precision || "?") + " / " + (body.backend || "?");
    var lat = body.latency_ms || {};
    var parts = [];
    if (typeof lat.total === "number") { parts.push("server " + lat.total.toFixed(0) + " ms"); }
    if (typeof lat.inference === "number") { parts.push("model " + lat.inference.toFixed(1) + " ms"); }
    parts.push("round trip " + roundTripMs.toFixed(0) + " ms");
    $("result-latency").textContent = parts.join(" · ");
    $("result-request").textContent = body.request_id || "";
    drawGauge(p, threshold);
    announceResult(body);
    $("result-stale").hidden = true;
    result.hidden = false;
    state.hasResult = true;
    if (result.scrollIntoView) {
      // Portrait: the page scrolls to the result. Landscape: only the left-hand column does.
      result.scrollIntoView({ behavior: "smooth", block: "start" });
    }
  }

  // What the screen's measured operating point means, in words a clinician reads at a glance:
  // sensitivity as "finds about N in 10 anemic children", 1 - specificity as "wrongly flags about
  // M in 10 others". The figures come from /v1/model, measured on the model's own threshold.
  function aboutInTen(fraction) {
    var n = Math.round(fraction * 10);
    if (n <= 0) { return "fewer than 1 in 10"; }
    if (n >= 10) { return "almost all"; }
    return "about " + n + " in 10";
  }

  function pointFor(body) {
    var model = state.model;
    if (!model) { return { text: "The screen's accuracy is not known: the page could not read it from the server.", detail: "Not read from the server." }; }
    var op = model.operating_point;
    var m = body.model || {};
    if (m.sha256 && model.sha256 && m.sha256 !== model.sha256) {
      return { text: "The screen's accuracy is being read from the server again.", detail: "" };
    }
    if (!op || !op.known || !op.sensitivity || !op.specificity) {
      return { text: "The screen's accuracy is not known for this model.", detail: "Not measured for this model." };
    }
    var figures = "sensitivity " + roundPercent(op.sensitivity) + ", specificity " + roundPercent(op.specificity);
    var where = "Measured on " + [op.measured_on, op.interval].filter(Boolean).join("; ") + ".";
    if (!op.applies) {
      // The same precedence as service/model_info.py describe_operating_point: an overridden
      // threshold first, then a precision other than the one the figures were measured with.
      var served = typeof body.threshold === "number" ? body.threshold : model.threshold;
      var measuredPrecision = "fp32";  // service/model_info.py MEASURED_PRECISION
      var servedPrecision = body.precision || model.precision;
      if (served === op.threshold && servedPrecision && servedPrecision !== measuredPrecision) {
        return {
          text: "This server runs the " + servedPrecision.toUpperCase() + " engine; the screen's accuracy was measured for " +
            measuredPrecision.toUpperCase() + " and may differ for this result.",
          detail: "Measured for " + measuredPrecision.toUpperCase() + ": " + figures + ". " + where
        };
      }
      return {
        text: "This server uses its own threshold (" + percent(served) + "), so the screen's measured accuracy does not apply to this result.",
        detail: "Measured at the model's " + percent(op.threshold) + " threshold, not this one: " + figures + ". " + where
      };
    }
    return {
      text: "This screen finds " + aboutInTen(op.sensitivity.value) + " anemic children and wrongly flags " +
        aboutInTen(1 - op.specificity.value) + " others.",
      detail: figures.charAt(0).toUpperCase() + figures.slice(1) + ". " + where
    };
  }

  function roundPercent(rate) {
    var whole = function (x) { return String(Math.round(x * 100)); };
    return whole(rate.value) + "% (" + whole(rate.ci_low) + "–" + whole(rate.ci_high) + "%)";
  }

  function showAccuracy(body) {
    var words = pointFor(body);
    $("result-accuracy").textContent = words.text;
    $("result-accuracy-detail").textContent = words.detail;
    if (state.hasResult) { announceResult(body); }
  }

  function announceResult(body) {
    // One short paragraph for screen readers; the details table stays out of the announcement.
    $("announce").textContent = "Anemia probability " + percent(body.anemia_probability) + ". " +
      $("result-label").textContent + " " + $("result-accuracy").textContent +
      " A screening aid — confirm with a hemoglobin test.";
  }

  // Semicircular gauge: 0% on the left, 100% on the right, the threshold marked where the colours meet.
  var GAUGE = { cx: 120, cy: 120, r: 96 };

  function gaugePoint(fraction, radius) {
    var angle = Math.PI * (1 - Math.min(1, Math.max(0, fraction)));
    return [GAUGE.cx + radius * Math.cos(angle), GAUGE.cy - radius * Math.sin(angle)];
  }

  function arcPath(from, to) {
    var a = gaugePoint(from, GAUGE.r), b = gaugePoint(to, GAUGE.r);
    return "M " + a[0].toFixed(2) + " " + a[1].toFixed(2) + " A " + GAUGE.r + " " + GAUGE.r + " 0 0 1 " +
      b[0].toFixed(2) + " " + b[1].toFixed(2);
  }

  function drawGauge(probability, threshold) {
    $("gauge-low").setAttribute("d", arcPath(0, threshold));
    $("gauge-high").setAttribute("d", arcPath(threshold, 1));
    var t0 = gaugePoint(threshold, GAUGE.r - 18), t1 = gaugePoint(threshold, GAUGE.r + 18);
    var tick = $("gauge-threshold");
    tick.setAttribute("x1", t0[0]); tick.setAttribute("y1", t0[1]);
    tick.setAttribute("x2", t1[0]); tick.setAttribute("y2", t1[1]);
    var tip = gaugePoint(probability, GAUGE.r - 8);
    var needle = $("gauge-needle");
    needle.setAttribute("x2", tip[0]); needle.setAttribute("y2", tip[1]);
  }

  // ------------------------------------------------------------------------------------------
  // Start.

  if (typeof ResizeObserver === "function") {
    new ResizeObserver(function () { resizeCanvas(); }).observe(stage);
  } else {
    window.addEventListener("resize", resizeCanvas);
  }
  resizeCanvas();
  showKeyStatus();
  updateControls();
  checkService();

  // A small hook for automated tests and debugging; it only reads state.
  window.anemiaPage = {
    view: function () { return Object.assign({ fitScale: state.fitScale }, state.view); },
    roi: function () { return currentRoi(); },
    toNatural: function (x, y) { return toNatural(x, y); }
  };
})();
