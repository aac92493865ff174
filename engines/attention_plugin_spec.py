"""Names and wiring of the ELITE cross-attention TensorRT plugin, shared by the ONNX exporter and
the plugin registration (attention_plugin_trt.py). Plain constants: no torch, no tensorrt.

The plugin id is "elite::cross_attention", the same string as the PyTorch custom op
(attention_op.OP_NAME). How TensorRT's ONNX parser finds it (onnx-tensorrt's fallback plugin
importer, used for any op type it has no built-in importer for):
  - node op_type           = PLUGIN_OP_NAME (the plugin's name, without namespace)
  - attribute plugin_namespace (STRING) = PLUGIN_NAMESPACE
  - attribute plugin_version   (STRING) = PLUGIN_VERSION; quickly deployable (tensorrt.plugin)
    plugins always register version "1", and the parser defaults to "1" when it is absent
  - attribute aot (INT 1; onnx-graphsurgeon writes Python True as INT 1): pick the plugin's
    ahead-of-time implementation (@trtp.aot_impl), whose compiled kernel is baked into the engine
    so the engine runs without Python. Without it the parser asks for the Python JIT
    implementation (@trtp.impl), which this plugin does not have, and the build fails.
  - node domain: PLUGIN_NAMESPACE. ONNX wants custom ops outside the default domain (the model
    then needs an opset_import for it, version PLUGIN_DOMAIN_VERSION); TensorRT >= 10.10 also
    reads the namespace from the domain.
Other node attributes are ignored by the parser unless the plugin declares them as fields; this
plugin has none (the softmax scale is head_dim**-0.5, compiled into the kernel).

Inputs, in order: q, k, v, k_l, v_l (all float16, or all float32), idx (int32: cast int64
positions before the node). Shapes: q [B,H,Nq,d]; k, v [B,H,Nk,d]; k_l, v_l [B,C,H,Nl,d] (C
concepts); idx [B,C]. Outputs, in order: out_g ([B,H,Nq,d]), out_l ([B,C,H,Nq,d]) in q's dtype,
m ([B,C,H,Nq], float32). d must be static in the engine (the kernel is compiled per head dim);
B, C, Nq, Nk, Nl may be dynamic.
"""

PLUGIN_NAMESPACE = "elite"
PLUGIN_OP_NAME = "cross_attention"
PLUGIN_VERSION = "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_OP_NAME}"
PLUGIN_DOMAIN_VERSION = 1

ONNX_NODE_ATTRIBUTES: dict[str, str | int] = {
    "plugin_namespace": PLUGIN_NAMESPACE,
    "plugin_version": PLUGIN_VERSION,
    "aot": 1,
}
INPUT_NAMES = ("q", "k", "v", "k_l", "v_l", "idx")
OUTPUT_NAMES = ("out_g", "out_l", "m")
