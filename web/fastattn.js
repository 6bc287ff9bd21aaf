// The pack's frontend extension: shows the text report of the Attention Inspector, Attention
// Report and Compare Images nodes on the node, and starts a new Calibrate node with a fixed seed.
// The report is display only: it is neither saved in the workflow nor sent with the prompt.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const REPORT_NODES = ["FastAttnInspector", "FastAttnReport", "FastAttnCompare"];

app.registerExtension({
  name: "FastAttn.ShowReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORT_NODES.includes(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      const widget = ComfyWidgets.STRING(this, "report_text", ["STRING", { multiline: true }], app).widget;
      widget.element.readOnly = true;
      widget.element.style.fontFamily = "monospace";
      widget.serialize = false;
      widget.options.serialize = false;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === "report_text");
      if (widget) widget.value = (message?.text ?? []).join("");
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
