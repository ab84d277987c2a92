"""Fast paths that trade stock numerics for speed or memory: fp8 linear layers, CUDA graphs,
TorchScript traces on CPU."""
