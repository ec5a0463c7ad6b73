"""Speed and memory benchmarks of the fastnca ops against plain PyTorch baselines
(``fastnca bench``). Each case runs every usable backend and the baselines in one process,
on one device, and reports medians, memory and ratios against the PyTorch baseline."""
