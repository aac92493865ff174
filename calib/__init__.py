"""The calibration set: prompts and concept images that precision choices are judged on."""
