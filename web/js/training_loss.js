// Live training loss: the training node pushes "ipakit.training" events
// {node, step, total, loss, done, status}; we keep the history per node and draw it on that node.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { contentBottom, ipakit } from "./common.js";

const PLOT_HEIGHT = 90;
const MAX_POINTS = 4000;
ipakit.training ??= {}; // node id -> {points: [[step, loss]], step, total, done, status}

// Execution ids are "12" or, inside subgraphs, "5:12" (path of node ids).
function findNode(executionId) {
  let graph = app.graph;
  let node = null;
  for (const id of String(executionId).split(":")) {
    node = graph?.getNodeById(id) ?? graph?.getNodeById(Number(id));
    graph = node?.subgraph;
  }
  return node ?? null;
}

function record(event) {
  const id = String(event.node);
  let run = ipakit.training[id];
  // A new run starts when the last one finished or the step count went back.
  if (!run || (run.done && !event.done) || event.step < run.step) {
    run = ipakit.training[id] = { points: [], step: 0, total: 0, done: false, status: "" };
  }
  const last = run.points.at(-1);
  const loss = Number(event.loss);
  if (Number.isFinite(loss)) {
    if (last && last[0] === event.step) last[1] = loss;
    else run.points.push([event.step, loss]);
    if (run.points.length > MAX_POINTS) run.points = run.points.filter((_, i) => i % 2 === 0);
  }
  Object.assign(run, { step: event.step, total: event.total, done: !!event.done, status: event.status ?? "" });
  return run;
}

function drawLoss(node, ctx) {
  if (node.flags?.collapsed) return;
  const run = ipakit.training[String(node.id)] ?? { points: [], step: 0, total: 0, status: "waiting for training" };
  const x0 = 10, y0 = contentBottom(node) + 6, w = node.size[0] - 20, h = PLOT_HEIGHT;
  ctx.save();
  ctx.fillStyle = "#111";
  ctx.fillRect(x0, y0, w, h);
  ctx.strokeStyle = "#444";
  ctx.strokeRect(x0, y0, w, h);

  const pts = run.points;
  if (pts.length > 1) {
    const losses = pts.map((p) => p[1]);
    const lo = Math.min(...losses), hi = Math.max(...losses), span = hi - lo || 1;
    const firstStep = pts[0][0], lastStep = Math.max(run.total, pts.at(-1)[0]), steps = lastStep - firstStep || 1;
    ctx.beginPath();
    pts.forEach(([s, l], i) => {
      const x = x0 + ((s - firstStep) / steps) * w, y = y0 + h - 4 - ((l - lo) / span) * (h - 8);
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.strokeStyle = run.done ? "#8c8" : "#fc6";
    ctx.lineWidth = 1.5;
    ctx.stroke();
  }

  const loss = pts.length ? pts.at(-1)[1].toPrecision(4) : "-";
  ctx.font = "12px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillStyle = "#ddd";
  const text = `loss ${loss} · step ${run.step}/${run.total}` + (run.status ? ` · ${run.status}` : "");
  ctx.fillText(text, x0, y0 + h + 4, w);
  ctx.restore();
}

// Draw on any node that receives events (IPAKitTrain, or a test emitter); patch each node instance once.
function attach(node) {
  if (node.ipakitLossAttached) return;
  node.ipakitLossAttached = true;
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (ctx) {
    onDrawForeground?.apply(this, arguments);
    drawLoss(this, ctx);
  };
  const height = contentBottom(node) + PLOT_HEIGHT + 28;
  node.setSize([Math.max(node.size[0], 280), Math.max(node.size[1], height)]);
}

api.addEventListener("ipakit.training", ({ detail }) => {
  if (!detail || detail.node == null) return;
  record(detail);
  const node = findNode(detail.node);
  if (!node) return;
  attach(node);
  app.graph.setDirtyCanvas(true, false);
});

app.registerExtension({
  name: "ipadapter_kit.training_loss",
  nodeCreated(node) {
    if (node.comfyClass === "IPAKitTrain" || node.constructor?.comfyClass === "IPAKitTrain") attach(node);
  },
});
