"""Pure-PyTorch ground truth of every op: written for clarity, used by the tests and as the fallback."""
