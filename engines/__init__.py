"""Engine building: TensorRT settings and profiles, the engine cache, the attention plugin."""
