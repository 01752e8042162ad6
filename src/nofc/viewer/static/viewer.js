/* nofc view: an image and its nofc map in OpenSeadragon.
 *
 * info.json says the sizes and the geometry. The image is image.dzi (a slide at level 0
 * unless told otherwise); the overlay of class K is overlay/K.dzi, one pixel per map cell,
 * placed where info.overlay says (cell (i, j) is the square of side `cell` at
 * (x + j*cell, y + i*cell) in the image's pixels: centred on its window's centre).
 * Overlay tiles hold probability codes (0: no value, 1 + round(254 p)), or for the class
 * view (overlay/class.dzi) class codes 1 + k; they are coloured here, so the threshold
 * and the palette change without new requests. The readout reads cells/R_C.bin and says
 * where the pointer is in level-0 pixels and microns (slides) or map coordinates
 * (rasters); the scale bar uses the same info.coords.
 *
 * For tests: window.nofcReady is true once every tile the view needs is loaded and drawn
 * (it turns false on any change); window.nofc holds the viewer, counters and the scale bar.
 */
"use strict";

(async function () {
  const $ = (id) => document.getElementById(id);
  const info = await (await fetch("info.json", { cache: "no-store" })).json();
  const version = "?v=" + info.key;
  const W = info.image.width; // viewport units: the image is 1 wide
  const state = {
    info, cls: info.classes[0].index, opacity: 0.6, threshold: 0,
    palette: Object.keys(info.palettes)[0], image: null, overlay: null, lut: null,
    tiles: { image: 0, overlay: 0 }, maxLevel: { image: -1, overlay: -1 },
    pending: 0, animating: false, cell: null, scale: null,
  };
  window.nofc = state; // state.settle(): call after changing the view from a script
  window.nofcReady = false;
  document.title = "nofc view: " + info.title;
  $("title").textContent = info.title;
  if (info.map.values === "probabilities") {
    document.querySelector("#colorbar .caption").textContent =
      "probability (as stored); below the threshold: not drawn";
  }
  const stretch = info.image.stretch;
  if (stretch) {
    $("stretch").hidden = false;
    $("stretch").textContent = `image stretched: ${stretch.percentiles.join("-")} percentiles, ` +
      stretch.low.map((lo, b) => `${lo}..${stretch.high[b]}`).join(", ") +
      (info.image.format === "png" ? "; no data: transparent" : "");
  }

  const viewer = OpenSeadragon({
    id: "osd", prefixUrl: "openseadragon/images/", tileSources: "image.dzi" + version,
    drawer: "canvas", imageSmoothingEnabled: false, showNavigator: true,
    maxZoomPixelRatio: 16, visibilityRatio: 0.5, animationTime: 0.5,
    gestureSettingsMouse: { clickToZoom: false },
  });
  state.viewer = viewer;
  // overlays by their tiles' address: the navigator's copies of the images count too
  const isOverlay = (tiledImage) => /(^|\/)overlay\/$/.test(
    (tiledImage.source && tiledImage.source.tilesUrl || "").replace(/([0-9]+|class)_files\/$/, ""));

  // ---- readiness, for tests and for nothing else
  let timer = null, generation = 0;
  function settle() {
    window.nofcReady = false;
    generation += 1;
    clearTimeout(timer);
    timer = setTimeout(check, 50);
  }
  function check() {
    const items = [];
    for (let i = 0; i < viewer.world.getItemCount(); i++) items.push(viewer.world.getItemAt(i));
    const done = state.overlay && items.length === 2 && state.pending === 0 &&
      !state.animating && items.every((t) => t.getFullyLoaded());
    if (!done) { timer = setTimeout(check, 50); return; }
    const mine = generation;
    viewer.forceRedraw();
    requestAnimationFrame(() => requestAnimationFrame(() => {
      if (mine === generation) window.nofcReady = true;
    }));
  }
  state.settle = settle;
  viewer.addHandler("animation-start", () => { state.animating = true; settle(); });
  viewer.addHandler("animation-finish", () => { state.animating = false; settle(); });
  viewer.addHandler("viewport-change", settle);
  viewer.addHandler("tile-loaded", (e) => {
    const kind = isOverlay(e.tiledImage) ? "overlay" : "image";
    state.tiles[kind] += 1;
    state.maxLevel[kind] = Math.max(state.maxLevel[kind], e.tile.level);
  });

  // ---- colours
  function buildLut() {
    const pal = info.palettes[state.palette], lut = new Uint8ClampedArray(256 * 4);
    if (state.cls === "class") { // class codes 1 + k: the legend's colours
      for (const c of info.legend) lut.set([...c.color, 255], (c.index + 1) * 4);
      return lut;
    }
    for (let v = 1; v < 256; v++) {
      const p = (v - 1) / 254;
      if (p < state.threshold) continue; // transparent
      const c = Math.round(p * 255) * 3;
      lut.set([pal[c], pal[c + 1], pal[c + 2], 255], v * 4);
    }
    return lut;
  }
  function drawColorbar() {
    const canvas = $("colorbar-canvas"), ctx = canvas.getContext("2d");
    const pal = info.palettes[state.palette];
    for (let x = 0; x < 256; x++) {
      const below = x / 255 < state.threshold;
      ctx.fillStyle = below ? "#ddd" : `rgb(${pal[3 * x]},${pal[3 * x + 1]},${pal[3 * x + 2]})`;
      ctx.fillRect(x, 0, 1, canvas.height);
    }
  }
  viewer.addHandler("tile-invalidated", async (e) => {
    if (!isOverlay(e.tiledImage)) return;
    const ctx = await e.getData("context2d");
    if (!ctx || e.outdated()) return;
    const { width, height } = ctx.canvas;
    const pixels = ctx.getImageData(0, 0, width, height), d = pixels.data, lut = state.lut;
    for (let i = 0; i < d.length; i += 4) {
      const v = d[i] * 4;
      d[i] = lut[v]; d[i + 1] = lut[v + 1]; d[i + 2] = lut[v + 2]; d[i + 3] = lut[v + 3];
    }
    ctx.putImageData(pixels, 0, 0);
    await e.setData(ctx, "context2d");
  });
  function recolour() {
    state.lut = buildLut();
    drawColorbar();
    if (!state.overlay) return;
    state.pending += 1;
    settle();
    Promise.resolve(viewer.requestInvalidate(true)).finally(() => {
      state.pending -= 1;
      settle();
    });
  }

  // ---- the overlay of one class
  function showClass(k) {
    state.cls = k;
    state.lut = buildLut();
    $("colorbar").hidden = k === "class";
    $("legend").hidden = k !== "class";
    $("threshold").disabled = $("palette").disabled = k === "class"; // probabilities only
    state.pending += 1;
    settle();
    const old = state.overlay;
    viewer.addTiledImage({
      tileSource: `overlay/${k}.dzi${version}`,
      x: info.overlay.x / W, y: info.overlay.y / W,
      width: (info.map.width * info.overlay.cell) / W,
      opacity: state.opacity,
      success: (e) => {
        state.overlay = e.item;
        if (old) viewer.world.removeItem(old);
        e.item.addHandler("fully-loaded-change", settle);
        state.pending -= 1;
        settle();
      },
      error: (e) => { state.pending -= 1; console.warn("overlay", k, e.message); },
    });
  }

  // ---- controls
  const select = $("class");
  for (const c of info.classes) {
    const option = document.createElement("option");
    option.value = c.index;
    option.textContent = `${c.name} (peak ${c.peak.toFixed(3)})`;
    select.appendChild(option);
  }
  const byClass = document.createElement("option");
  byClass.value = "class";
  byClass.textContent = info.map.class_band ? "class band (legend)" : "most probable class (legend)";
  select.appendChild(byClass);
  select.addEventListener("change", () =>
    showClass(select.value === "class" ? "class" : Number(select.value)));
  for (const c of info.legend) {
    const item = document.createElement("div"), swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${c.color.join(",")})`;
    item.append(swatch, c.name);
    $("legend").appendChild(item);
  }
  for (const name of Object.keys(info.palettes)) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("palette").appendChild(option);
  }
  $("palette").addEventListener("change", () => { state.palette = $("palette").value; recolour(); });
  $("opacity").addEventListener("input", () => {
    state.opacity = Number($("opacity").value);
    $("opacity-value").textContent = state.opacity.toFixed(2);
    if (state.overlay) state.overlay.setOpacity(state.opacity);
    settle();
  });
  $("threshold").addEventListener("input", () => {
    state.threshold = Number($("threshold").value);
    $("threshold-value").textContent = state.threshold.toFixed(2);
    recolour();
  });

  // ---- readout: the cell under the pointer
  const cellTiles = new Map();
  function cellTile(r, c) {
    const key = `${r}_${c}`;
    if (!cellTiles.has(key)) {
      if (cellTiles.size > 64) cellTiles.delete(cellTiles.keys().next().value);
      cellTiles.set(key, fetch(`cells/${key}.bin${version}`).then((res) => {
        if (!res.ok) throw new Error(`cells/${key}.bin: ${res.status}`);
        return res.arrayBuffer();
      }));
    }
    return cellTiles.get(key);
  }
  async function topClasses(i, j) {
    const T = info.cells.tile, n = info.cells.top;
    const r = Math.floor(i / T), c = Math.floor(j / T);
    const th = Math.min(T, info.map.height - r * T), tw = Math.min(T, info.map.width - c * T);
    const buf = await cellTile(r, c), size = th * tw;
    const index = new Uint16Array(buf, 0, n * size), prob = new Uint16Array(buf, 2 * n * size, n * size);
    const at = (i - r * T) * tw + (j - c * T), out = [];
    for (let q = 0; q < n; q++) {
      const k = index[q * size + at];
      if (k !== 65535) out.push({ index: k, p: prob[q * size + at] / 65535 });
    }
    return out;
  }
  const names = {};
  for (const c of info.classes) names[c.index] = c.name;
  const frame = document.createElement("div"); // the hovered cell's window
  frame.id = "window-frame";
  const [dy, dx] = info.image.downsample; // level-0 pixels per pixel shown
  function outline(box) { // box: level-0 pixels
    const rect = new OpenSeadragon.Rect(box[1] / dx / W, box[0] / dy / W,
      (box[3] - box[1]) / dx / W, (box[2] - box[0]) / dy / W);
    if (viewer.getOverlayById(frame)) viewer.updateOverlay(frame, rect);
    else viewer.addOverlay({ element: frame, location: rect });
  }
  const coords = info.coords, round = (v, n) => Number(v.toFixed(n));
  function where(y, x) { // a pixel shown (y, x) in words: level-0 pixels, microns, map
    if (coords.kind === "world") {
      const [a, b, c, d, e, f] = coords.transform, n = coords.unit === "°" ? 6 : 2;
      const X = a * x + b * y + c, Y = d * x + e * y + f;
      return `at x = ${X.toFixed(n)}, y = ${Y.toFixed(n)} ${coords.unit}` +
        (coords.crs ? ` (${coords.crs})` : "");
    }
    const text = `at (y, x) = (${Math.floor(y * dy)}, ${Math.floor(x * dx)}) level-0 px`;
    if (coords.kind !== "slide") return text;
    const u = coords.per_pixel;
    return text + ` = (${round(y * u, 1)}, ${round(x * u, 1)}) µm`;
  }
  let asked = 0;
  async function readout(position) {
    const mine = ++asked;
    const vp = viewer.viewport.pointFromPixel(position);
    const x = vp.x * W, y = vp.y * W, s = info.overlay.cell;
    const i = Math.floor((y - info.overlay.y) / s), j = Math.floor((x - info.overlay.x) / s);
    const el = $("readout"), at = where(y, x);
    if (i < 0 || j < 0 || i >= info.map.height || j >= info.map.width) {
      state.cell = null;
      if (viewer.getOverlayById(frame)) viewer.removeOverlay(frame);
      el.textContent = `${at}\nno map cell here`;
      return;
    }
    let box, label;
    if (info.map.window) { // the cell's window, in level-0 pixels
      const [oy, ox] = info.map.offset, [wh, ww] = info.map.window, st = info.map.step;
      const f = info.map.downsample;
      box = [oy + i * st, ox + j * st, oy + i * st + wh, ox + j * st + ww].map((v) => round(v * f, 2));
      label = "window";
    } else { // a GeoTIFF: its cell's square
      const y0 = info.overlay.y + i * s, x0 = info.overlay.x + j * s;
      box = [y0 * dy, x0 * dx, (y0 + s) * dy, (x0 + s) * dx].map((v) => round(v, 2));
      label = "cell square";
    }
    let top;
    try { top = await topClasses(i, j); } catch (err) { top = []; console.warn(err.message); }
    if (mine !== asked) return;
    state.cell = { i, j, box, top, at };
    outline(box);
    el.textContent = `cell (${i}, ${j})\n` +
      `${label} (y0, x0, y1, x1) = (${box.join(", ")})\n` +
      (top.length ? top.map((t) => `${t.p.toFixed(3)}  ${names[t.index]}`).join("\n")
        : "no value (NaN)") + `\n${at}`;
  }

  // ---- scale bar: a round length, about 120 screen pixels long
  const bar = document.createElement("div");
  bar.id = "scalebar";
  bar.innerHTML = '<div class="bar"></div><span class="label"></span>';
  viewer.container.appendChild(bar);
  const units = { "µm": [[1000, "mm"], [1, "µm"]], m: [[1000, "km"], [1, "m"]],
    px: [[1, "px"]], "°": [[1, "°"]] };
  function scaleLabel(v) {
    for (const [f, u] of units[coords.unit] || [[1, coords.unit]]) {
      if (v >= f) return `${Number((v / f).toPrecision(3))} ${u}`;
    }
    return `${Number(v.toPrecision(3))} ${coords.unit}`;
  }
  function updateScale() {
    const z = viewer.viewport.deltaPixelsFromPointsNoRotate(
      new OpenSeadragon.Point(1 / W, 0), true).x; // screen pixels per pixel shown
    if (!(z > 0)) return;
    const perScreen = coords.per_pixel / z, raw = perScreen * 120;
    const e = Math.pow(10, Math.floor(Math.log10(raw)));
    const value = [5, 2, 1].map((m) => m * e).find((v) => v <= raw);
    const px = value / perScreen;
    bar.firstChild.style.width = `${px.toFixed(1)}px`;
    bar.lastChild.textContent = scaleLabel(value);
    state.scale = { value, unit: coords.unit, px, label: bar.lastChild.textContent };
  }
  viewer.addHandler("update-viewport", updateScale);
  new OpenSeadragon.MouseTracker({
    element: viewer.container,
    moveHandler: (e) => { readout(e.position); },
  }).setTracking(true);

  viewer.addHandler("open", () => {
    state.image = viewer.world.getItemAt(0);
    state.image.addHandler("fully-loaded-change", settle);
    showClass(state.cls);
  });
  state.lut = buildLut();
  drawColorbar();
  settle();
})();
