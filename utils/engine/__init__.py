"""What one training step and one evaluation pass compute: the fast path, the objective and its
losses and penalties, which parameters train and decay, global-batch BatchNorm, the metrics."""
