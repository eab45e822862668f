// IPAKitLoadAdapter: show what the loaded adapter is and which CLIP vision encoder it needs.
// The node returns {"ui": {"ipakit_info": [info]}}; the frontend hands that to onExecuted. The info is kept in the
// node's properties, so it is saved with the workflow and shown again after a reload, and it is drawn only while
// the file widget still names the file it describes.
import { app } from "../../../scripts/app.js";
import { contentBottom, ipakit } from "./common.js";

const NODE_TYPE = "IPAKitLoadAdapter";
const LINE_HEIGHT = 16;
ipakit.loaderInfo ??= {}; // node id -> last info dict (read by the host tests)

function infoLines(info) {
  const params = Number(info.parameters);
  return [
    [info.variant, info.family, info.encoder, `${info.num_tokens} tokens`, `fusion: ${info.fusion ? "yes" : "no"}`].join(" · "),
    `CLIP vision ${info.encoder} (${info.clip_output}) · ${info.cross_attention_layers} layers` +
      (Number.isFinite(params) ? ` · ${(params / 1e6).toFixed(1)}M params` : ""),
  ];
}

app.registerExtension({
  name: "ipadapter_kit.loader_info",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;

    nodeType.prototype.ipakitShowInfo = function (info) {
      this.properties ??= {};
      this.properties.ipakit_info = info;
      ipakit.loaderInfo[this.id] = info;
      this.ipakitInfoLines = infoLines(info);
      const min = this.computeSize();
      const height = min[1] + this.ipakitInfoLines.length * LINE_HEIGHT + 8;
      this.setSize([Math.max(this.size[0], min[0], 330), Math.max(this.size[1], height)]);
      app.graph.setDirtyCanvas(true, false);
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const info = message?.ipakit_info?.[0];
      if (info) this.ipakitShowInfo(info);
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      onConfigure?.apply(this, arguments);
      const info = this.properties?.ipakit_info;
      if (info) this.ipakitInfoLines = infoLines(info);
    };

    // The lines to draw: none while collapsed, or when another file was chosen since (the info is stale).
    nodeType.prototype.ipakitVisibleInfoLines = function () {
      if (!this.ipakitInfoLines || this.flags?.collapsed) return null;
      const file = this.widgets?.find((w) => w.name === "adapter_file")?.value;
      return file === this.properties?.ipakit_info?.file ? this.ipakitInfoLines : null;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      const lines = this.ipakitVisibleInfoLines();
      if (!lines) return;
      const top = contentBottom(this) + 6;
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.textBaseline = "top";
      ctx.fillStyle = "#9cf";
      lines.forEach((line, i) => ctx.fillText(line, 10, top + i * LINE_HEIGHT, this.size[0] - 20));
      ctx.restore();
    };
  },
});
