"""The reference CBAM model trained on scikit-learn's digits (offline data), for INT8 tests and benchmarks."""
