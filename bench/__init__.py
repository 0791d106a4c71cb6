"""Benchmarks of the compiled UNet against eager PyTorch (``python bench/unet_bench.py --help``)."""
