"""Side-by-side benchmarks: the plugin (emulated XPU) against vLLM's in-tree CPU backend."""
