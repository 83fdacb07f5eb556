"""Ahead-of-time compiles for accelerators this machine does not have.

train.py / eval.py --aot_topology: targets (TPU slices via libtpu, GPUs via
the CUDA plugin) -> compiler (the very step train.py runs, the largest
per-chip batch that fits) -> report (one table and a verdict); hlo_stats
reads the compiled module (memory, collectives, bytes per instruction);
flags defines the --aot_* flags.
"""
