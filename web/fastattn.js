// The pack's frontend extension: shows the text report of the Attention Inspector, Attention
// Report and Compare Images nodes, and Calibrate's cost table, on the node, and starts a new
// Calibrate node with a fixed seed.
// The report is display only: it is neither saved in the workflow nor sent with the prompt.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const REPORT_NODES = ["FastAttnInspector", "FastAttnReport", "FastAttnCompare", "FastAttnCalibrate"];
const REPORT_WIDGET = "report_text"; // the read-only text box of frontends without a text preview

// Newer frontends (1.58 does, 1.32 does not) export the text preview of their own "Preview as
// Text" node, which both the canvas and the Vue node renderer draw; older ones get a read-only
// multiline text box.
const textPreview = () => window.comfyAPI?.textPreviewWidgets;

function addReport(node) {
  const preview = textPreview();
  if (preview) return preview.addTextPreviewWidgets(node);
  const widget = ComfyWidgets.STRING(node, REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
  widget.element.readOnly = true;
  widget.element.style.fontFamily = "monospace";
  widget.options.read_only = true;
  widget.serialize = false;
  widget.options.serialize = false;
}

function showReport(node, message) {
  const text = (message?.text ?? []).join("");
  const preview = textPreview();
  if (preview) return preview.updateTextPreviewWidgets(node, { text: [text] });
  const widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (widget) widget.value = text;
}

app.registerExtension({
  name: "FastAttn.ShowReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORT_NODES.includes(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      addReport(this);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      showReport(this, message);
    };
  },
});

// The frontend randomizes a seed after each queue by default, so re-queuing a workflow would
// calibrate again: a new Calibrate node starts at "fixed" (a loaded workflow keeps its own choice).
app.registerExtension({
  name: "FastAttn.FixedCalibrationSeed",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "FastAttnCalibrate") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      const seed = this.widgets?.find((w) => w.name === "seed");
      const control = seed?.linkedWidgets?.find((w) => w.name === "control_after_generate");
      if (control) control.value = "fixed";
    };
  },
});
