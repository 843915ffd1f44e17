"""Shared test settings. Fixtures for servers and reference models live in tests/fixtures_*.py modules."""
import torch

# Deterministic, comparable numbers: the parity tests compare against diffusers run in the same process.
torch.set_num_threads(max(1, torch.get_num_threads()))
