"""Training: the loop (`loop.py`), atomic checkpoints with exact resume (`checkpoint.py`) and the memory
estimate with its advice (`memory.py`).

Nothing is imported here on purpose: `import instructkit.train.memory` must not pull in the training loop,
and the loop must not pull in evaluation code. Import the module you need.
"""
