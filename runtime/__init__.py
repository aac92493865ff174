"""The lean runtime behind elite-run. Must not import torch, diffusers or transformers."""
