import torch

# Tiny test models are dominated by per-op overhead; one thread avoids thread-pool contention on a
# 2-core CI machine and keeps the suite fast and repeatable.
torch.set_num_threads(1)
