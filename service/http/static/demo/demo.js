// The demo page: a photo through POST /v1/expressions, or the webcam through WS /v1/stream
// (protocol: docs/streaming.md). Plain script, no build step, nothing loaded from outside.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  const statusLine = $("status");
  const video = $("video");
  // Distinct colours per track id (photo faces use their index).
  const PALETTE = ["#00e676", "#ff9100", "#2979ff", "#f50057", "#ffea00", "#00e5ff", "#d500f9", "#76ff03"];
  const BARS = 3;

  // State the browser tests read (window.fermamDemo); also handy in the console.
  const demo = (window.fermamDemo = {
    classes: [], mode: "idle", photoResult: null, lastResult: null, results: 0, errors: [],
    tracksSeen: new Set(), dropped: 0, latencyMs: null,
  });

  const apiKey = () => $("api-key").value.trim();
  const headers = () => (apiKey() ? { "X-API-Key": apiKey() } : {});
  $("api-key").value = localStorage.getItem("fermam-api-key") || "";
  $("api-key").addEventListener("change", () => localStorage.setItem("fermam-api-key", apiKey()));

  function setStatus(text, isError = false) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", isError);
    if (isError) demo.errors.push(text);
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
      const card = body.models[0];
      demo.classes = card.classes;
      $("model").textContent = `${card.name} ${card.version} on ${card.device}, faces by ${card.face_backend}`;
    } catch (error) {
      $("model").textContent = `model card unavailable: ${error.message}`;
    }
  }

  // -- drawing --------------------------------------------------------------------------------

  // The canvas holds the image at its own pixels; on screen it is scaled to fit both the page's
  // width and the window's height below the canvas's top, so a portrait photo is seen whole.
  const BOTTOM_MARGIN_PX = 16;
  function fitCanvas() {
    const room = canvas.parentElement.clientWidth;
    const top = canvas.getBoundingClientRect().top + window.scrollY;
    const tall = Math.max(window.innerHeight - top - BOTTOM_MARGIN_PX, window.innerHeight / 2);
    const scale = Math.min(room / canvas.width, tall / canvas.height);
    canvas.style.width = `${Math.floor(canvas.width * scale)}px`;
    canvas.style.height = `${Math.floor(canvas.height * scale)}px`;
  }

  // Landmarks always come with a result and are drawn only while the box is ticked, so ticking
  // it redraws the last photo rather than asking the server again.
  const showLandmarks = () => $("landmarks").checked;
  let lastPhoto = null; // {bitmap, image} of the photo on the canvas

  function drawFaces(source, width, height, faces) {
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
      fitCanvas();
    }
    ctx.drawImage(source, 0, 0, width, height);
    const unit = Math.max(1, Math.round(Math.max(width, height) / 400));
    faces.forEach((face, index) => drawFace(face, index, unit));
  }

  function drawFace(face, index, unit) {
    const id = face.track_id !== undefined ? face.track_id : index;
    const colour = PALETTE[id % PALETTE.length];
    const { x, y, width, height } = face.box;
    ctx.lineWidth = 2 * unit;
    ctx.strokeStyle = colour;
    ctx.strokeRect(x, y, width, height);
    if (face.landmarks && showLandmarks()) {
      ctx.fillStyle = colour;
      for (const [px, py] of face.landmarks) ctx.fillRect(px - unit, py - unit, 2 * unit, 2 * unit);
    }
    // The smoothed expression of a track when there is one, else this frame's scores.
    const shown = face.smoothed || face;
    const ranked = Object.entries(shown.scores).sort((a, b) => b[1] - a[1]).slice(0, BARS);
    const title = `${face.track_id !== undefined ? "#" + face.track_id + " " : ""}${shown.expression}`;
    const font = 11 * unit;
    ctx.font = `${font}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    // Title above the box; bars below it (or inside when the box touches the bottom edge).
    const titleWidth = ctx.measureText(title).width + 6 * unit;
    const titleY = Math.max(0, y - font - 4 * unit);
    ctx.fillStyle = colour;
    ctx.fillRect(x - unit, titleY, titleWidth, font + 4 * unit);
    ctx.fillStyle = "#000";
    ctx.fillText(title, x + 2 * unit, titleY + 2 * unit);
    const barHeight = font + 2 * unit;
    const panelWidth = Math.max(width, 120 * unit);
    let top = y + height + 2 * unit;
    if (top + BARS * barHeight > canvas.height) top = y + height - BARS * barHeight - 2 * unit;
    ctx.fillStyle = "rgba(0, 0, 0, 0.6)";
    ctx.fillRect(x, top, panelWidth, BARS * barHeight);
    ranked.forEach(([label, score], row) => {
      const rowY = top + row * barHeight;
      ctx.fillStyle = colour;
      ctx.fillRect(x, rowY + unit, panelWidth * score, barHeight - 2 * unit);
      ctx.fillStyle = "#fff";
      ctx.fillText(`${label} ${(score * 100).toFixed(0)}%`, x + 2 * unit, rowY + unit);
    });
  }

  // -- photo: POST /v1/expressions -----------------------------------------------------------

  async function analysePhoto(file) {
    stopCamera();
    demo.mode = "photo";
    lastPhoto = null;
    setStatus(`analysing ${file.name}...`);
    const form = new FormData();
    form.append("files", file, file.name);
    form.append("top_k", "3");
    form.append("return_landmarks", "true");
    try {
      const [response, bitmap] = await Promise.all([
        fetch("/v1/expressions", { method: "POST", body: form, headers: headers() }),
        createImageBitmap(file, { imageOrientation: "from-image" }),
      ]);
      const body = await response.json();
      if (!response.ok) throw new Error(`${response.status} ${body.error.code}: ${body.error.message}`);
      const image = body.images[0];
      lastPhoto = { bitmap, image };
      drawFaces(bitmap, image.width, image.height, image.faces);
      demo.photoResult = body;
      const summary = image.faces.map((f) => f.expression).join(", ") || "no face found";
      setStatus(`${image.faces.length} face(s): ${summary} (${body.timings.total_ms.toFixed(0)} ms on the server)`);
    } catch (error) {
      setStatus(`photo failed: ${error.message}`, true);
    }
  }

  // -- webcam: WS /v1/stream, one frame in flight (send the next when the reply arrives) ------

  let stream = null;
  let socket = null;
  let inFlight = null; // {bitmap, sentAt} of the frame the server is working on
  let frames = 0;
  let startedAt = 0;
  const grab = document.createElement("canvas");

  async function startCamera() {
    demo.mode = "camera";
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    } catch (error) {
      setStatus(`no camera: ${error.message}`, true);
      return;
    }
    video.srcObject = stream;
    await video.play();
    const query = new URLSearchParams({ top_k: "3", return_landmarks: "true" });
    if (apiKey()) query.set("api_key", apiKey());
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/v1/stream?${query}`);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => { startedAt = performance.now(); sendFrame(); };
    socket.onmessage = (event) => onMessage(JSON.parse(event.data));
    socket.onclose = (event) => {
      if (demo.mode === "camera") setStatus(`stream closed (${event.code}${event.reason ? " " + event.reason : ""})`, event.code !== 1000);
      stopCamera();
    };
    $("camera").textContent = "Stop the webcam";
  }

  function stopCamera() {
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000);
    socket = null;
    if (stream) stream.getTracks().forEach((track) => track.stop());
    stream = null;
    inFlight = null;
    $("camera").textContent = "Start the webcam";
  }

  async function sendFrame() {
    if (!socket || socket.readyState !== WebSocket.OPEN || inFlight || video.videoWidth === 0) {
      if (socket && !inFlight) requestAnimationFrame(sendFrame);
      return;
    }
    grab.width = video.videoWidth;
    grab.height = video.videoHeight;
    grab.getContext("2d").drawImage(video, 0, 0);
    inFlight = { bitmap: await createImageBitmap(grab), sentAt: performance.now() };
    grab.toBlob((blob) => {
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(blob);
    }, "image/jpeg", 0.85);
  }

  function onMessage(message) {
    if (message.type === "session") {
      demo.session = message;
      return;
    }
    if (message.type === "result") {
      demo.results += 1;
      demo.lastResult = message;
      demo.dropped = message.dropped_total || 0;
      message.faces.forEach((face) => demo.tracksSeen.add(face.track_id));
      const frame = inFlight;
      if (frame) {
        demo.latencyMs = performance.now() - frame.sentAt;
        drawFaces(frame.bitmap, message.width, message.height, message.faces);
      }
      frames += 1;
      const fps = frames / ((performance.now() - startedAt) / 1000);
      const tracks = message.faces.map((f) => `#${f.track_id} ${(f.smoothed || f).expression}`).join(", ") || "no face";
      setStatus(`frame ${message.frame_id}: ${tracks} | ${fps.toFixed(1)} fps, ${demo.latencyMs.toFixed(0)} ms, ${demo.dropped} dropped`);
    } else if (message.type === "error") {
      setStatus(`stream error ${message.code}: ${message.message}`, true);
      if (message.frame_id === null) return; // the server closes the session next
    } else if (message.type === "session_end") {
      demo.sessionEnd = message;
      return;
    } else {
      return;
    }
    inFlight = null;
    sendFrame();
  }

  $("photo").addEventListener("change", (event) => {
    const file = event.target.files[0];
    // Cleared, so that picking the same file again is a change and is sent again.
    event.target.value = "";
    if (file) analysePhoto(file);
  });
  $("landmarks").addEventListener("change", () => {
    if (demo.mode === "photo" && lastPhoto) {
      const { bitmap, image } = lastPhoto;
      drawFaces(bitmap, image.width, image.height, image.faces);
    }
  });
  window.addEventListener("resize", fitCanvas);
  $("camera").addEventListener("click", () => (stream ? (demo.mode = "idle", stopCamera()) : startCamera()));
  fitCanvas();
  loadModel();
})();
