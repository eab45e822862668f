"""The toy worlds: tiny random SD-architecture models (`tiny`) for plumbing tests, and the shapes world
(`world`, `oracle`, `model`, `pretrain`, `experiment`, `grid`) where training can be measured on a CPU."""
