// EchoGen Sampler: show the size a width/height request really gives (it snaps to Infinity's aspect templates)
// and its token count, next to the width and height widgets. Asks GET /echogen/schedule (nodes/comfy_bridge.py),
// debounced; anything missing (route, widget, older frontend) leaves the node exactly as it was.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "EchoGenSampler";
const DELAY_MS = 300;
const cache = new Map();

async function fetchSchedule(width, height) {
  const key = `${width}x${height}`;
  if (cache.has(key)) return cache.get(key);
  try {
    const res = await api.fetchApi(`/echogen/schedule?width=${encodeURIComponent(width)}&height=${encodeURIComponent(height)}`);
    if (!res || !res.ok) return null;
    const info = await res.json();
    if (!Number.isFinite(info?.width) || !Number.isFinite(info?.height)) return null;
    cache.set(key, info);
    return info;
  } catch {
    return null;
  }
}

function show(node, width, height) {
  try {
    const ui = node.__echogen;
    ui.w.label = width == null ? ui.wLabel : `${ui.wLabel ?? "width"} → ${width}`;
    ui.h.label = height == null ? ui.hLabel : `${ui.hLabel ?? "height"} → ${height}`;
    node.setDirtyCanvas?.(true, false);
  } catch {
    // display only
  }
}

function refresh(node) {
  const ui = node.__echogen;
  if (!ui) return;
  clearTimeout(ui.timer);
  ui.timer = setTimeout(async () => {
    const width = Number(ui.w.value), height = Number(ui.h.value);
    if (!Number.isFinite(width) || !Number.isFinite(height) || width <= 0 || height <= 0) return;
    const asked = (ui.asked = `${width}x${height}`);
    const info = await fetchSchedule(width, height);
    if (info && ui.asked === asked) show(node, info.width, `${info.height} · ${info.tokens} tokens`);
  }, DELAY_MS);
}

function attach(node) {
  try {
    const widgets = node.widgets ?? [];
    const w = widgets.find((x) => x.name === "width");
    const h = widgets.find((x) => x.name === "height");
    if (!w || !h || node.__echogen) return;
    node.__echogen = { w, h, wLabel: w.label, hLabel: h.label, timer: null, asked: "" };
    for (const widget of [w, h]) {
      const callback = widget.callback;
      widget.callback = function (...args) {
        const r = callback?.apply(this, args);
        refresh(node);
        return r;
      };
    }
    refresh(node);
  } catch {
    // leave the node as it is
  }
}

app.registerExtension({
  name: "EchoGen.SamplerSize",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      attach(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {  // a loaded workflow sets values without callbacks
      const r = onConfigure?.apply(this, args);
      attach(this);
      refresh(this);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output, ...rest) {  // the sampler's ui: ["WxH", tokens]
      const r = onExecuted?.apply(this, [output, ...rest]);
      const [size, tokens] = output?.echogen_size ?? [];
      const [width, height] = typeof size === "string" ? size.split("x") : [];
      if (this.__echogen && width && height) show(this, width, `${height} · ${tokens} tokens`);
      return r;
    };
  },
});
