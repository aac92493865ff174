"""Benchmarks: `elite-export bench` (the three ways: run.py, ways.py, measure.py, report.py) and
`elite-export bench-ort` (ONNX Runtime settings and profile: ort.py); their commands in cli.py."""
