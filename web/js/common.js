// Shared by the ipadapter_kit extensions (a module with no extension of its own).

// window.__ipakit: state the extensions keep, readable from the console and by the host tests.
export const ipakit = (window.__ipakit ??= {});

// Top of the free area below a node's widgets: where the last drawn widget ends, else the node's minimum height.
export function contentBottom(node) {
  const bottoms = (node.widgets ?? [])
    .filter((w) => !w.hidden && w.last_y != null)
    .map((w) => w.last_y + (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT));
  return bottoms.length ? Math.max(...bottoms) : node.computeSize()[1];
}
