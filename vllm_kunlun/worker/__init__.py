"""Worker classes: vLLM's workers, subclassed for the Kunlun device runtimes."""
